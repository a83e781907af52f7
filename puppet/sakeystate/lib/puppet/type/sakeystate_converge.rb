# frozen_string_literal: true

require_relative '../../puppet_x/sakeystate/cli'

Puppet::Type.newtype(:sakeystate_converge) do
  @doc = <<-DOC
    @summary Publishes this control plane's certificate and converges its bundle with sakeystate.

    Declared by the `sakeystate` class; use the class. It orders itself after every
    file the state reads (autorequire): the state file, the certificate to publish,
    `own_cert`, the trust anchors' and etcd's CA, client and password files, and the
    bundle's directory, when the catalog manages them. A freshly reimaged node
    therefore converges in one run whatever the manifest order.

    Each property's current value is sakeystate's own verdict, so a `--noop` run
    logs, at notice level, either `would converge: <the plan's summary>` or
    `cannot plan: <the error>` (etcd unreachable, an invalid state, an old
    sakeystate), never the same text for both.
  DOC

  newparam(:name, namevar: true) do
    desc 'A name for the resource (the class uses `sakeystate`).'
  end

  newparam(:state_file) do
    desc 'The desired-state file.'
    validate { |v| raise ArgumentError, "state_file must be absolute: #{v}" unless v.to_s.start_with?('/') }
  end

  newparam(:state_content) do
    desc 'The state file content when the catalog manages it (read only to order the files it names).'
  end

  newparam(:sakeystate_path) do
    desc 'Absolute path of the sakeystate executable.'
    defaultto '/usr/local/bin/sakeystate'
  end

  newparam(:host) do
    desc 'This control plane (`--host`); default the state\'s host, else the node\'s FQDN.'
  end

  newparam(:cert) do
    desc 'The certificate to publish instead of the state\'s own_cert.'
  end

  newparam(:guard) do
    desc 'How the current value is read: `plan` (`plan --detailed-exitcode`) or `check`.'
    newvalues(:plan, :check)
    defaultto :plan
  end

  newparam(:no_reload, boolean: true) do
    desc 'Converge with `--no-reload` (the restart is left to `sakeystate reload`).'
    newvalues(:true, :false)
    defaultto :false
  end

  newparam(:timeout) do
    desc 'Seconds a converge may take (etcd timeout + reload_timeout).'
    defaultto 600
    munge { |v| Integer(v) }
  end

  # Properties sync in this order: the publish first, so the converge sees the key.
  newproperty(:published) do
    desc '`published`: this host\'s certificate is in etcd (`sakeystate publish`).'
    newvalues(:published)

    def insync?(is)
      is.to_s == 'published'
    end

    def is_to_s(value) # rubocop:disable Naming/PredicateName
      PuppetX::Sakeystate.verdict(value, 'would publish')
    end

    def should_to_s(value)
      value.to_s
    end

    def change_to_s(current, _should)
      verdict = current.to_s
      return "cannot check the publish (it runs and reports it): #{verdict.delete_prefix('error: ')}" if verdict.start_with?('error: ')
      'published this host\'s certificate'
    end
  end

  newproperty(:converged) do
    desc '`in_sync`: etcd and the bundle match the state, and no restart is owed.'
    newvalues(:in_sync)

    def insync?(is)
      is.to_s == 'in_sync'
    end

    def is_to_s(value) # rubocop:disable Naming/PredicateName
      PuppetX::Sakeystate.verdict(value, 'would converge')
    end

    def should_to_s(value)
      value.to_s
    end

    def change_to_s(current, _should)
      verdict = current.to_s
      return "cannot plan (the converge runs and reports it): #{verdict.delete_prefix('error: ')}" if verdict.start_with?('error: ')
      "converged: #{verdict.delete_prefix('drift: ')}"
    end
  end

  autorequire(:file) do
    files = [self[:state_file], self[:cert], self[:sakeystate_path]].compact
    files + PuppetX::Sakeystate.files_of_state(self[:state_content], self[:state_file].to_s)
  end
end
