# frozen_string_literal: true

require 'spec_helper'

describe 'sakeystate::boot' do
  it { is_expected.to compile.with_all_deps }
  it { is_expected.to contain_file('/etc/systemd/system/sakeystate-boot.service').with_source('puppet:///modules/sakeystate/sakeystate-boot.service') }
  it { is_expected.to contain_file('/etc/systemd/system/sakeystate-boot-done.service').with_source('puppet:///modules/sakeystate/sakeystate-boot-done.service') }

  it do
    is_expected.to contain_file('/etc/systemd/system/sakeystate-boot.service.d/puppet.conf')
      .with_content(%r{^ExecStart="/usr/local/bin/sakeystate" "converge" "--no-reload" "--state" "/etc/sakeystate/state.yaml" "--host" "ctrl1001.example.org"$})
  end

  it do
    is_expected.to contain_file('/etc/systemd/system/sakeystate-boot-done.service.d/puppet.conf')
      .with_content(%r{^ExecStart="/usr/local/bin/sakeystate" "reload-done" "--wait-ready" "--state" "/etc/sakeystate/state.yaml" "--host" "ctrl1001.example.org"$})
  end

  it { is_expected.to contain_service('sakeystate-boot').with_enable(true).without_ensure }
  it { is_expected.to contain_service('sakeystate-boot-done').with_enable(true).without_ensure }
end
