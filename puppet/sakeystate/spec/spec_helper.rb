# frozen_string_literal: true

# rspec-puppet for the sakeystate module: catalogs compiled from the manifests in this
# checkout (the module path is the directory holding the module), with the facts a
# Debian control plane has. tests/test_puppet.py runs `rspec` here.
require 'rspec-puppet'

RSpec.configure do |c|
  c.module_path = File.expand_path('../..', __dir__)
  c.manifest = File.expand_path('fixtures/site.pp', __dir__)
  c.default_facts = {
    'networking' => { 'fqdn' => 'ctrl1001.example.org', 'hostname' => 'ctrl1001' },
    'os' => { 'family' => 'Debian', 'name' => 'Debian', 'release' => { 'major' => '12' } },
  }
end
