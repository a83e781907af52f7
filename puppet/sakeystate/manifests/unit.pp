# @summary A unit file shipped with sakeystate, unchanged, plus this host's drop-in.
#
# Used by `sakeystate::watch` and `sakeystate::boot`. The drop-in replaces the unit's
# `ExecStart=` and `ReadWritePaths=`, each argument quoted for systemd. (Puppet's
# systemd provider reloads systemd before it starts or restarts a changed unit.)
#
# @param unit_dir
#   Where the unit and its drop-in go.
# @param owner
#   Who manages it (a comment in the drop-in).
# @param argv
#   The command line of `ExecStart=`.
# @param read_write_paths
#   The unit's `ReadWritePaths=`.
define sakeystate::unit (
  Sakeystate::Absolutepath $unit_dir,
  String[1]                $owner,
  Array[String[1], 1]      $argv,
  Array[String[1], 1]      $read_write_paths,
) {
  file { "${unit_dir}/${title}":
    ensure => file,
    source => "puppet:///modules/sakeystate/${title}",
    mode   => '0644',
  }
  file { "${unit_dir}/${title}.d":
    ensure => directory,
    mode   => '0755',
  }
  file { "${unit_dir}/${title}.d/puppet.conf":
    ensure  => file,
    mode    => '0644',
    content => epp('sakeystate/dropin.epp', {
        'unit'             => $title,
        'owner'            => $owner,
        'argv'             => $argv,
        'read_write_paths' => $read_write_paths,
    }),
  }
}
