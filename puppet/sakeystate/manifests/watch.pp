# @summary Run `sakeystate watch` as a hardened systemd service.
#
# Installs the unit shipped with sakeystate (`files/sakeystate-watch.service`, the
# same file as the repository's `examples/systemd/`), unchanged, and a drop-in
# `sakeystate-watch.service.d/puppet.conf` with this host's command line (`--host`,
# the state file, the metrics file) and its writable paths, then runs the service.
# Nothing subscribes to the state file: the watcher notices edits by itself.
#
# With watch deployed, watch owns the restarts. Keep the `sakeystate` class if you
# like (as a safety net): every restart path takes the same lock and clears the same
# owed marker, so a restart watch already made is never repeated by Puppet.
#
# @example
#   class { 'sakeystate::watch':
#     host             => $facts['networking']['fqdn'],
#     read_write_paths => ['/etc/kubernetes/pki', '-/var/lib/prometheus/node-exporter'],
#   }
#
# @param sakeystate_path
#   Absolute path of the sakeystate executable.
# @param state_file
#   The desired-state file.
# @param host
#   This control plane's fully qualified name (`--host`).
# @param metrics
#   Write Prometheus metrics to `metrics_textfile` (node_exporter's textfile collector).
# @param metrics_textfile
#   The Prometheus textfile (`--metrics-textfile`).
# @param read_write_paths
#   The service's only writable paths (`ReadWritePaths=`, replacing the unit's): the
#   directory of `bundle.path` (and of `jwks_path`), then the metrics directory
#   (`-` in front: a missing directory does not stop the service).
# @param extra_args
#   More arguments of `sakeystate watch` (for instance `['--debounce', '2s']`).
# @param unit_dir
#   Where the unit and its drop-in go.
# @param manage_service
#   Manage `Service['sakeystate-watch']` (running and enabled).
# @param ensure
#   `running` or `stopped`.
# @param enable
#   Start it at boot.
class sakeystate::watch (
  Sakeystate::Absolutepath           $sakeystate_path  = '/usr/local/bin/sakeystate',
  Sakeystate::Absolutepath           $state_file       = '/etc/sakeystate/state.yaml',
  Sakeystate::Fqdn                   $host             = $facts['networking']['fqdn'],
  Boolean                            $metrics          = true,
  Sakeystate::Absolutepath           $metrics_textfile = '/var/lib/prometheus/node-exporter/sakeystate.prom',
  Array[String[1], 1]                $read_write_paths = ['/etc/kubernetes/pki', '-/var/lib/prometheus/node-exporter'],
  Array[String[1]]                   $extra_args       = [],
  Sakeystate::Absolutepath           $unit_dir         = '/etc/systemd/system',
  Boolean                            $manage_service   = true,
  Enum['running', 'stopped']         $ensure           = 'running',
  Boolean                            $enable           = true,
) {
  $metrics_args = $metrics ? {
    true    => ['--metrics-textfile', $metrics_textfile],
    default => [],
  }
  sakeystate::unit { 'sakeystate-watch.service':
    unit_dir         => $unit_dir,
    owner            => 'class sakeystate::watch',
    argv             => [$sakeystate_path, 'watch', '--state', $state_file, '--host', $host] + $metrics_args + $extra_args,
    read_write_paths => $read_write_paths,
  }
  if $manage_service {
    service { 'sakeystate-watch':
      ensure    => $ensure,
      enable    => $enable,
      subscribe => Sakeystate::Unit['sakeystate-watch.service'],
    }
  }
}
