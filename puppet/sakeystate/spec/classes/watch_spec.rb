# frozen_string_literal: true

require 'spec_helper'

describe 'sakeystate::watch' do
  it { is_expected.to compile.with_all_deps }
  it { is_expected.to contain_file('/etc/systemd/system/sakeystate-watch.service').with_source('puppet:///modules/sakeystate/sakeystate-watch.service') }

  it do
    is_expected.to contain_file('/etc/systemd/system/sakeystate-watch.service.d/puppet.conf')
      .with_content(%r{^ExecStart="/usr/local/bin/sakeystate" "watch" "--state" "/etc/sakeystate/state.yaml" "--host" "ctrl1001.example.org" })
      .with_content(%r{^ReadWritePaths="/etc/kubernetes/pki" "-/var/lib/prometheus/node-exporter"$})
  end

  it { is_expected.to contain_service('sakeystate-watch').with('ensure' => 'running', 'enable' => true).that_subscribes_to('Sakeystate::Unit[sakeystate-watch.service]') }

  context 'without metrics, with a path to quote' do
    let(:params) { { 'metrics' => false, 'state_file' => '/etc/sake state/%s.yaml' } }

    it do
      is_expected.to contain_file('/etc/systemd/system/sakeystate-watch.service.d/puppet.conf')
        .with_content(%r{"--state" "/etc/sake state/%%s.yaml" "--host" "ctrl1001.example.org"$})
    end
  end
end
