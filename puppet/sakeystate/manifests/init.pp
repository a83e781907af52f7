# @summary Keep kube-apiserver's service-account key bundle converged with sakeystate.
#
# Every command runs as an argv array (no shell), so paths may hold spaces.
#
# The guard decides when `sakeystate converge` runs:
#
# * `guard => 'plan'` (the default, fail-safe): `unless => sakeystate plan
#   --detailed-exitcode`. Only exit 0 ("in sync") skips the converge; a drift (2), an
#   error (1) or a crash of a broken install (any other code) runs it, and the converge
#   then fails the Puppet run with the tool's message. Nothing depends on how the tool
#   maps its failures.
# * `guard => 'check'`: `onlyif => sakeystate check`, the tool's own `onlyif` command
#   (0 drift or any failure, 1 in sync). Use it when you want check's own reporting on
#   every run; it relies on check exiting 0 on every failure, which sakeystate
#   guarantees for a crash too.
#
# In `--noop` both forms show the converge as "current_value 'notrun', should be ['0']"
# for a drift and for a failure alike; with `--debug` Puppet also logs the guard's
# output (`Exec[sakeystate converge]/unless: ...`): the plan, or the error.
#
# @param state_file
#   The reviewed desired-state file (one file for every control plane: `host: self`,
#   `bundle.exclude_host: self`).
# @param state_content
#   When set, the content of `state_file`, managed here and validated by
#   `sakeystate validate` before it replaces the file (an invalid state never lands).
# @param sakeystate
#   Absolute path of the sakeystate executable.
# @param host
#   This control plane's fully qualified name (`--host`); default: the state's `host`,
#   else the node's FQDN.
# @param guard
#   `plan` (fail-safe, the default) or `check`; see above.
# @param publish
#   Publish this host's certificate (`own_cert`, or `cert`) in etcd, guarded by
#   `unless => sakeystate publish --check` (0 already published, 2 would publish,
#   1 error: the publish then runs and reports it).
# @param cert
#   The certificate to publish instead of the state's `own_cert`.
# @param restart
#   A resource that restarts kube-apiserver (for instance `Service['kube-apiserver']`).
#   When set, the converge runs with `--no-reload` and this resource is notified only
#   when a restart is owed (the bundle's key set changed, or an earlier restart was
#   not confirmed); `sakeystate reload-done`, subscribed to it, confirms the restart.
#   A failed restart therefore leaves it owed, and the next run restarts exactly once.
#   When unset, the converge runs `bundle.reload` of the state itself.
# @param timeout
#   Seconds Puppet waits for a converge (etcd timeout plus `bundle.reload_timeout`).
class sakeystate (
  Sakeystate::Absolutepath           $state_file    = '/etc/sakeystate/state.yaml',
  Optional[String[1]]                $state_content = undef,
  Sakeystate::Absolutepath           $sakeystate    = '/usr/local/bin/sakeystate',
  Optional[Sakeystate::Fqdn]         $host          = undef,
  Enum['plan', 'check']              $guard         = 'plan',
  Boolean                            $publish       = false,
  Optional[Sakeystate::Absolutepath] $cert          = undef,
  Optional[Type[Resource]]           $restart       = undef,
  Integer[1]                         $timeout       = 600,
) {
  $host_args = $host ? {
    undef   => [],
    default => ['--host', $host],
  }
  $state_args = ['--state', $state_file] + $host_args
  # The converge runs when etcd or the bundle drifted, a restart is owed, or the guard failed.
  $needed = $guard ? {
    'plan'  => { 'unless' => [[$sakeystate, 'plan', '--detailed-exitcode'] + $state_args] },
    default => { 'onlyif' => [[$sakeystate, 'check', '--quiet'] + $state_args] },
  }

  if $state_content {
    file { $state_file:
      ensure       => file,
      content      => $state_content,
      mode         => '0644',
      validate_cmd => "${sakeystate} validate %",
      before       => Exec['sakeystate converge'],
    }
  }

  if $publish {
    $cert_args = $cert ? {
      undef   => [],
      default => ['--cert', $cert],
    }
    exec { 'sakeystate publish':
      command   => [$sakeystate, 'publish'] + $state_args + $cert_args,
      unless    => [[$sakeystate, 'publish', '--check'] + $state_args + $cert_args],
      logoutput => true,
      before    => Exec['sakeystate converge'],
    }
  }

  $reload_args = $restart ? {
    undef   => [],
    default => ['--no-reload'],
  }
  exec { 'sakeystate converge':
    command   => [$sakeystate, 'converge'] + $state_args + $reload_args,
    logoutput => true,
    timeout   => $timeout,
    *         => $needed,
  }

  if $restart {
    # After a successful converge, the guard only sees a drift when a restart is owed.
    exec { 'sakeystate restart owed':
      command => [$sakeystate, '--version'],
      require => Exec['sakeystate converge'],
      notify  => $restart,
      *       => $needed,
    }
    exec { 'sakeystate reload-done':
      command     => [$sakeystate, 'reload-done'] + $state_args,
      refreshonly => true,
      logoutput   => true,
      subscribe   => $restart,
    }
  }
}
