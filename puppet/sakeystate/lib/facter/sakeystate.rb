# frozen_string_literal: true

# The `sakeystate` fact: this control plane's bundle as sakeystate left it.
#
#   bundle_kids        kids in the bundle (from its `# <kid> <host>` comment lines)
#   reload_owed        whether a kube-apiserver restart is owed (the marker beside the bundle)
#   status_record_since, status_record_age_seconds
#                      this host's status record in etcd (`sakeystate status`)
#   version            the installed sakeystate
#   error              why a part could not be read (the others are still there)
#
# Read from SAKEYSTATE_STATE (default /etc/sakeystate/state.yaml) with the executable
# SAKEYSTATE_PATH (default /usr/local/bin/sakeystate), for the host SAKEYSTATE_HOST
# (default the node's FQDN); absent unless both exist.
# Only the status record needs etcd: one read, bounded by the state's etcd timeout.
require 'json'
require 'time'
require 'yaml'
require_relative '../puppet_x/sakeystate/cli'

Facter.add(:sakeystate) do
  state_file = ENV.fetch('SAKEYSTATE_STATE', '/etc/sakeystate/state.yaml')
  executable = ENV.fetch('SAKEYSTATE_PATH', '/usr/local/bin/sakeystate')
  confine { File.exist?(state_file) && File.executable?(executable) }

  setcode do
    fact = {}
    errors = []
    begin
      state = YAML.safe_load(File.read(state_file, 1 << 20), aliases: false)
      bundle = state.is_a?(Hash) && state['bundle'].is_a?(Hash) ? state['bundle']['path'] : nil
      if bundle.is_a?(String)
        text = File.exist?(bundle) ? File.read(bundle, 16 << 20) : ''
        fact['bundle_kids'] = text.scan(%r{^# ([A-Za-z0-9_-]{43}) }).flatten.sort
        fact['reload_owed'] = File.exist?("#{bundle}.reload-pending")
      end
    rescue Psych::Exception, SystemCallError => e
      errors << "#{state_file}: #{e.message}"
    end

    result = PuppetX::Sakeystate.run([executable, '--version'], timeout: 30)
    fact['version'] = result.out.strip.delete_prefix('sakeystate ') if result.status.zero?

    host = ENV['SAKEYSTATE_HOST'] || Facter.value(:networking)&.dig('fqdn')
    command = [executable, 'status', '--state', state_file, '--format', 'json']
    command += ['--host', host] if host
    status = PuppetX::Sakeystate.run(command, timeout: 60)
    begin
      raise JSON::ParserError, status.reason unless [0, 2].include?(status.status)
      report = JSON.parse(status.out)
      mine = (report['hosts'] || []).find { |h| h['host'] == host }
      since = mine && mine['record_since']
      if since
        fact['status_record_since'] = since
        fact['status_record_age_seconds'] = (Time.now - Time.parse(since)).to_i
      end
    rescue JSON::ParserError, ArgumentError => e
      errors << "status: #{e.message}"
    end
    fact['error'] = errors.join('; ') unless errors.empty?
    fact
  end
end
