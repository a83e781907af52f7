"""sakeystate: converge kube-apiserver service-account key bundles from a reviewed state file."""

__version__ = "0.3.0"
