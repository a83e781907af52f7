# @summary Converge the service-account key bundle at boot, before kube-apiserver starts.
#
# Installs the units shipped with sakeystate (`files/sakeystate-boot.service` and
# `files/sakeystate-boot-done.service`, the same files as the repository's
# `examples/systemd/`), unchanged, and a drop-in for each with this host's command line
# and writable paths, and enables them. At boot the first runs
# `sakeystate converge --no-reload` ordered before `kube-apiserver.service`, so a host
# that was down while keys were published or revoked never serves a stale bundle; it
# restarts nothing, and a failure does not keep kube-apiserver from starting. The second
# runs `sakeystate reload-done --wait-ready` once kube-apiserver is ready, which writes
# this host's status record.
#
# @example
#   include sakeystate::boot
#
# @param sakeystate_path
#   Absolute path of the sakeystate executable.
# @param state_file
#   The desired-state file.
# @param host
#   This control plane's fully qualified name (`--host`).
# @param read_write_paths
#   The unit's only writable paths (`ReadWritePaths=`): the directory of `bundle.path`.
# @param extra_args
#   More arguments of the boot-time `sakeystate converge`.
# @param unit_dir
#   Where the unit and its drop-in go.
# @param manage_service
#   Enable `Service['sakeystate-boot']` and `Service['sakeystate-boot-done']` (they are
#   not started by Puppet: they run at boot).
class sakeystate::boot (
  Sakeystate::Absolutepath $sakeystate_path  = '/usr/local/bin/sakeystate',
  Sakeystate::Absolutepath $state_file       = '/etc/sakeystate/state.yaml',
  Sakeystate::Fqdn         $host             = $facts['networking']['fqdn'],
  Array[String[1], 1]      $read_write_paths = ['/etc/kubernetes/pki'],
  Array[String[1]]         $extra_args       = [],
  Sakeystate::Absolutepath $unit_dir         = '/etc/systemd/system',
  Boolean                  $manage_service   = true,
) {
  sakeystate::unit { 'sakeystate-boot.service':
    unit_dir         => $unit_dir,
    owner            => 'class sakeystate::boot',
    argv             => [$sakeystate_path, 'converge', '--no-reload', '--state', $state_file, '--host', $host] + $extra_args,
    read_write_paths => $read_write_paths,
  }
  sakeystate::unit { 'sakeystate-boot-done.service':
    unit_dir         => $unit_dir,
    owner            => 'class sakeystate::boot',
    argv             => [$sakeystate_path, 'reload-done', '--wait-ready', '--state', $state_file, '--host', $host],
    read_write_paths => $read_write_paths,
  }
  if $manage_service {
    service { ['sakeystate-boot', 'sakeystate-boot-done']:
      enable  => true,
      require => [Sakeystate::Unit['sakeystate-boot.service'], Sakeystate::Unit['sakeystate-boot-done.service']],
    }
  }
}
