# frozen_string_literal: true

require 'open3'
require 'timeout'
require 'yaml'

# The one place the Puppet module's Ruby code runs the sakeystate command.
#
# Used by the sakeystate_converge provider and the sakeystate fact. It runs an argv
# array (no shell), checks the installed version once per executable, and sorts the
# CLI's stderr into its error and warning lines.
module PuppetX
  module Sakeystate
    # The oldest sakeystate whose commands and flags this module uses (reload, status).
    MIN_VERSION = '0.3.0'
    ERROR = 'sakeystate: error: '
    WARNING = 'sakeystate: warning: '

    # One finished command: exit status, stdout, stderr.
    Result = Struct.new(:status, :out, :err) do
      def errors
        err.lines.map(&:chomp).select { |l| l.start_with?(ERROR) }.map { |l| l.delete_prefix(ERROR) }
      end

      def warnings
        err.lines.map(&:chomp).select { |l| l.start_with?(WARNING) }.map { |l| l.delete_prefix(WARNING) }
      end

      # Why it failed, in the CLI's words (the last line of a crash otherwise).
      def reason
        return errors.join('; ') unless errors.empty?
        last = (err + out).lines.map(&:strip).reject(&:empty?).last
        last ? "exit #{status}: #{last}" : "exit #{status}"
      end
    end

    @versions = {}

    # A property's current value as logged (noop included): "would ...: why" for a drift,
    # "cannot plan: why" for a failure, so the two never read alike.
    def self.verdict(value, drift_verb)
      text = value.to_s
      return "'cannot plan: #{text.delete_prefix('error: ')}'" if text.start_with?('error: ')
      return "'#{drift_verb}: #{text.delete_prefix('drift: ')}'" if text.start_with?('drift: ')
      text
    end

    def self.run(argv, timeout: 600)
      out = err = ''
      status = nil
      Timeout.timeout(timeout) do
        out, err, process = Open3.capture3(*argv.map(&:to_s), stdin_data: '')
        status = process.exitstatus || 128 + process.termsig.to_i
      end
      Result.new(status, out, err)
    rescue SystemCallError => e
      Result.new(127, '', "#{ERROR}cannot run #{argv.first}: #{e.message}")
    rescue Timeout::Error
      Result.new(124, '', "#{ERROR}#{argv.take(2).join(' ')} did not finish within #{timeout} s")
    end

    # The version of the executable, or a Puppet::Error saying why it cannot be used.
    def self.require_version(executable)
      return @versions[executable] if @versions.key?(executable)
      result = run([executable, '--version'], timeout: 60)
      found = result.out.strip[%r{\Asakeystate (\d+\.\d+\.\d+)\S*\z}, 1]
      unless result.status.zero? && found
        raise Puppet::Error, "cannot tell the version of #{executable}: #{result.reason}"
      end
      if Gem::Version.new(found) < Gem::Version.new(MIN_VERSION)
        raise Puppet::Error,
              "the sakeystate Puppet module requires sakeystate >= #{MIN_VERSION}, found #{found} (#{executable})"
      end
      @versions[executable] = found
    end

    # The local files a state reads (own_cert, CA files, etcd credentials, the bundle's
    # directory), for autorequire: from the managed content when given, else the file.
    def self.files_of_state(content, path)
      text = content || (File.readable?(path) ? File.read(path, 1 << 20) : nil)
      data = text ? YAML.safe_load(text, aliases: false) : nil
      return [] unless data.is_a?(Hash)
      etcd = data['etcd'].is_a?(Hash) ? data['etcd'] : {}
      tls = etcd['tls'].is_a?(Hash) ? etcd['tls'] : {}
      auth = etcd['auth'].is_a?(Hash) ? etcd['auth'] : {}
      bundle = data['bundle'].is_a?(Hash) ? data['bundle'] : {}
      anchors = data['trust_anchors'].is_a?(Array) ? data['trust_anchors'] : []
      paths = [data['own_cert'], tls['ca_file'], tls['cert_file'], tls['key_file'], auth['password_file']]
      paths += anchors.map { |a| a.is_a?(Hash) ? a['ca_file'] : nil }
      paths << File.dirname(bundle['path']) if bundle['path'].is_a?(String)
      paths.select { |p| p.is_a?(String) && p.start_with?('/') }.uniq
    rescue Psych::Exception, SystemCallError
      [] # an unreadable or invalid state orders nothing; the converge reports it
    end
  end
end
