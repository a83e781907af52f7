# frozen_string_literal: true

require 'spec_helper'

describe 'sakeystate' do
  context 'with the defaults' do
    it { is_expected.to compile.with_all_deps }

    it do
      is_expected.to contain_sakeystate_converge('sakeystate').with(
        'state_file' => '/etc/sakeystate/state.yaml',
        'sakeystate_path' => '/usr/local/bin/sakeystate',
        'converged' => 'in_sync',
        'published' => nil,
        'no_reload' => false,
      )
    end

    it { is_expected.not_to contain_exec('sakeystate reload') }
    it { is_expected.not_to contain_file('/etc/sakeystate/state.yaml') }
  end

  context 'with restart_service (a String, as Hiera gives it)' do
    let(:params) { { 'restart_service' => 'kube-apiserver', 'publish' => true } }
    let(:pre_condition) { "service { 'kube-apiserver': ensure => running }" }

    it { is_expected.to compile.with_all_deps }
    it { is_expected.to contain_sakeystate_converge('sakeystate').with('no_reload' => true, 'published' => 'published') }

    it do
      is_expected.to contain_exec('sakeystate reload')
        .with('command' => ['/usr/local/bin/sakeystate', 'reload', '--state', '/etc/sakeystate/state.yaml'], 'refreshonly' => true)
        .that_subscribes_to('Sakeystate_converge[sakeystate]')
    end

    # The service is ordered before the restart, never after anything of sakeystate's.
    it { is_expected.to contain_service('kube-apiserver').that_comes_before('Exec[sakeystate reload]') }
    it { is_expected.not_to contain_service('kube-apiserver').that_requires('Sakeystate_converge[sakeystate]') }
    it { is_expected.not_to contain_service('kube-apiserver').that_subscribes_to('Exec[sakeystate reload]') }
  end

  context 'with restart_service and no such service in the catalog' do
    let(:params) { { 'restart_service' => 'kube-apiserver' } }

    it { is_expected.to compile.with_all_deps }
  end

  context 'with converge => false (the bootstrap stage)' do
    let(:params) { { 'converge' => false, 'publish' => true, 'restart_service' => 'kube-apiserver' } }

    it { is_expected.to contain_sakeystate_converge('sakeystate').with('converged' => nil, 'published' => 'published') }
    it { is_expected.not_to contain_exec('sakeystate reload') }
  end

  context 'with a managed state' do
    let(:params) { { 'state_content' => "apiVersion: sakeystate/v1\n", 'host' => 'ctrl1002.example.org' } }

    it do
      is_expected.to contain_file('/etc/sakeystate/state.yaml')
        .with('validate_cmd' => '/usr/local/bin/sakeystate validate %', 'mode' => '0644')
    end

    it { is_expected.to contain_sakeystate_converge('sakeystate').with('host' => 'ctrl1002.example.org') }
  end

  context 'with a resource reference for restart_service (the removed Type[Resource] form)' do
    let(:params) { { 'restart_service' => 'Service[kube-apiserver]' } }

    it { is_expected.to compile.and_raise_error(%r{restart_service}) }
  end

  context 'with a host that is not fully qualified' do
    let(:params) { { 'host' => 'ctrl1001' } }

    it { is_expected.to compile.and_raise_error(%r{host}) }
  end
end
