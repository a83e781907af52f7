# frozen_string_literal: true

require_relative '../../../puppet_x/sakeystate/cli'

Puppet::Type.type(:sakeystate_converge).provide(:cli) do
  desc <<-DOC
    Runs the sakeystate command (argv arrays, no shell). Reading a property runs the
    read-only half (`publish --check`, `plan --detailed-exitcode` or `check`);
    syncing it runs `publish` or `converge`. The installed sakeystate's version is
    checked first.
  DOC

  def exists?
    true
  end

  # --- published -------------------------------------------------------------------

  def published
    result = sakeystate('publish', *state_args, *cert_args, '--check')
    case result.status
    when 0 then :published
    when 2 then "drift: #{result.out.strip.lines.last&.strip || 'not published yet'}"
    else "error: #{result.reason}"
    end
  rescue Puppet::Error => e
    "error: #{e.message}"
  end

  def published=(_value)
    result = sakeystate('publish', *state_args, *cert_args)
    log_output(result)
    raise Puppet::Error, "sakeystate publish failed: #{result.reason}" unless result.status.zero?
  end

  # --- converged -------------------------------------------------------------------

  def converged
    resource[:guard].to_s == 'check' ? verdict_of_check : verdict_of_plan
  rescue Puppet::Error => e
    "error: #{e.message}"
  end

  def converged=(_value)
    args = ['converge', *state_args]
    args << '--no-reload' if resource[:no_reload].to_s == 'true'
    result = sakeystate(*args, timeout: resource[:timeout])
    log_output(result)
    raise Puppet::Error, "sakeystate converge failed: #{result.reason}" unless result.status.zero?
  end

  private

  def verdict_of_plan
    result = sakeystate('plan', '--detailed-exitcode', '--quiet', *state_args)
    case result.status
    when 0 then :in_sync
    when 2 then "drift: #{summary(result)}"
    else "error: #{result.reason}"
    end
  end

  # `check`: 0 drift or any failure (an error line on stderr tells which), 1 in sync.
  def verdict_of_check
    result = sakeystate('check', *state_args)
    return :in_sync if result.status == 1
    return "error: #{result.reason}" unless result.status.zero? && result.errors.empty?
    "drift: #{summary(result)}"
  end

  def summary(result)
    line = result.out.lines.map(&:strip).reject(&:empty?).last
    line || 'a change is pending'
  end

  def state_args
    args = ['--state', resource[:state_file]]
    args += ['--host', resource[:host]] if resource[:host]
    args
  end

  def cert_args
    resource[:cert] ? ['--cert', resource[:cert]] : []
  end

  def sakeystate(*args, timeout: 300)
    executable = resource[:sakeystate_path]
    PuppetX::Sakeystate.require_version(executable)
    result = PuppetX::Sakeystate.run([executable, *args], timeout: timeout)
    result.warnings.each { |w| warning(w) }
    result
  end

  def log_output(result)
    result.out.each_line { |line| notice(line.chomp) unless line.strip.empty? }
  end
end
