# @summary Keep kube-apiserver's service-account key bundle converged with sakeystate.
#
# The exec runs `sakeystate converge` only when `sakeystate check` exits 0. check
# exits 0 when a converge would change something (a pending reload counts) *or
# when the check itself failed* (etcd unreachable, invalid state, ...): the
# converge then runs, fails with the tool's message, and the Puppet run reports
# the failure instead of hiding it. check exits 1 when etcd and the bundle are
# in sync, and the resource stays unchanged.
#
# The converge itself restarts kube-apiserver (bundle.reload in the state file)
# when the bundle's key set changed, and retries a reload that failed earlier.
#
# @param state_file
#   The reviewed desired-state file, e.g. deployed by a file resource.
# @param sakeystate
#   Absolute path of the sakeystate executable.
# @param timeout
#   Seconds Puppet waits for a converge (etcd timeout plus bundle.reload_timeout).
class sakeystate (
  String  $state_file = '/etc/sakeystate/state.yaml',
  String  $sakeystate = '/usr/local/bin/sakeystate',
  Integer $timeout    = 600,
) {
  exec { 'sakeystate converge':
    command   => "${sakeystate} converge --state ${state_file}",
    onlyif    => "${sakeystate} check --quiet --state ${state_file}",
    logoutput => true,
    timeout   => $timeout,
  }
}
