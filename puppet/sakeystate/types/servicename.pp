# @summary A service's name as Puppet's `service` type and systemd know it (`kube-apiserver`, `kube-apiserver.service`).
type Sakeystate::Servicename = Pattern[/\A[A-Za-z0-9][A-Za-z0-9@_.:-]*\z/]
