# @summary A fully qualified host name, as `sakeystate --host` takes it.
type Sakeystate::Fqdn = Pattern[/\A([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?\z/]
