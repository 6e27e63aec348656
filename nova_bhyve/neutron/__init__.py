"""Neutron side of nova-bhyve: the ML2 mechanism driver for bhyve hosts.

Loaded by neutron-server, which need not have Nova installed: nothing here
imports Nova or the driver's machine layer.
"""
