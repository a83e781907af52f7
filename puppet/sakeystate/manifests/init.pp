# @summary Keep kube-apiserver's service-account key bundle converged with sakeystate.
#
# Declares one `sakeystate_converge` resource, which publishes this host's
# certificate (with `publish => true`) and converges etcd and the bundle. It orders
# itself after every file the state reads when the catalog manages it (the state
# file, the certificate, `own_cert`, the CA and etcd credential files, the bundle's
# directory), so a freshly reimaged node converges in one run whatever the
# manifest order.
#
# The guard is sakeystate's own verdict: `plan --detailed-exitcode` (default) or
# `check`. Only "in sync" skips the converge; a drift, an error or a crash runs it,
# and it then fails the run with the tool's message. In `--noop` the verdict is
# logged at notice level: `current_value 'would converge: <summary>'` for a drift,
# `current_value 'cannot plan: <error>'` when etcd cannot be read (or the state is
# invalid, or sakeystate is too old).
#
# Nothing here notifies or requires the kube-apiserver service, so a sakeystate
# failure (etcd down, a broken install) never keeps Puppet from keeping the
# apiserver running. A restart runs under sakeystate's cluster-wide lock: by the
# converge itself (default), or, with `restart_service`, by a refresh-only
# `exec { 'sakeystate reload': }` after the converge. `sakeystate reload` restarts
# only when a restart is owed, polls `reload_check`, writes the status record and
# clears the owed marker, so a restart is never lost and never repeated.
#
# Every sakeystate command checks the installed version first: an older sakeystate
# fails the run with "requires sakeystate >= 0.3.0, found X".
#
# @example One class for every control plane (the state in Hiera or a file)
#   class { 'sakeystate':
#     state_content   => file('profile/sakeystate/wikikube-eqiad.yaml'),
#     publish         => true,
#     restart_service => 'kube-apiserver',
#   }
#
# @param state_file
#   The reviewed desired-state file (one file for every control plane: `host: self`,
#   `bundle.exclude_host: self`).
# @param state_content
#   When set, the content of `state_file`, managed here and validated by
#   `sakeystate validate` before it replaces the file (an invalid state never lands).
# @param sakeystate_path
#   Absolute path of the sakeystate executable (0.3.0 or newer). The documented
#   install is a venv in `/opt/sakeystate` with its console script linked here.
# @param host
#   This control plane's fully qualified name (`--host`); default: the state's `host`,
#   else the node's FQDN.
# @param guard
#   `plan` (`plan --detailed-exitcode`, the default) or `check` (`sakeystate check`).
#   Both run the converge on a drift and on any failure.
# @param publish
#   Publish this host's certificate (`own_cert`, or `cert`) in etcd before the
#   converge, unless `sakeystate publish --check` says it is already there.
# @param cert
#   The certificate to publish instead of the state's `own_cert`.
# @param converge
#   `false` only publishes (and deploys the state): the first stage of bootstrapping
#   a new cluster, so that every host has published before any host converges.
# @param restart_service
#   The name of the service Puppet manages for kube-apiserver (for instance
#   `kube-apiserver`), a String so that Hiera can set it. The converge then runs with
#   `--no-reload`, and the owed restart is run by `exec { 'sakeystate reload': }`
#   (refresh-only, subscribed to the converge), ordered after `Service[<name>]` when
#   the catalog has it: never the other way round. The restart itself is the state's
#   `bundle.reload` (for instance `systemctl restart kube-apiserver`), under the lock.
# @param timeout
#   Seconds Puppet waits for a converge or a reload (etcd timeout plus
#   `bundle.reload_timeout`).
class sakeystate (
  Sakeystate::Absolutepath           $state_file      = '/etc/sakeystate/state.yaml',
  Optional[String[1]]                $state_content   = undef,
  Sakeystate::Absolutepath           $sakeystate_path = '/usr/local/bin/sakeystate',
  Optional[Sakeystate::Fqdn]         $host            = undef,
  Enum['plan', 'check']              $guard           = 'plan',
  Boolean                            $publish         = false,
  Optional[Sakeystate::Absolutepath] $cert            = undef,
  Boolean                            $converge        = true,
  Optional[Sakeystate::Servicename]  $restart_service = undef,
  Integer[1]                         $timeout         = 600,
) {
  $host_args = $host ? {
    undef   => [],
    default => ['--host', $host],
  }

  $published = $publish ? {
    true    => 'published',
    default => undef,
  }
  $converged = $converge ? {
    true    => 'in_sync',
    default => undef,
  }

  if $state_content {
    file { $state_file:
      ensure       => file,
      content      => $state_content,
      mode         => '0644',
      validate_cmd => "${sakeystate_path} validate %",
    }
  }

  sakeystate_converge { 'sakeystate':
    state_file      => $state_file,
    state_content   => $state_content,
    sakeystate_path => $sakeystate_path,
    host            => $host,
    cert            => $cert,
    guard           => $guard,
    no_reload       => $restart_service != undef,
    timeout         => $timeout,
    published       => $published,
    converged       => $converged,
  }

  if $restart_service and $converge {
    exec { 'sakeystate reload':
      command     => [$sakeystate_path, 'reload', '--state', $state_file] + $host_args,
      refreshonly => true,
      logoutput   => true,
      timeout     => $timeout,
      subscribe   => Sakeystate_converge['sakeystate'],
    }
    # Restart only a running apiserver; a failed restart never touches the service.
    Service <| title == $restart_service |> -> Exec['sakeystate reload']
  }
}
