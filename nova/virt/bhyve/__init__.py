"""Loads nova-bhyve for ``[DEFAULT] compute_driver = bhyve.BhyveDriver``.

Nova imports ``nova.virt.<compute_driver>``; this module, shipped by the
nova-bhyve-live wheel, re-exports the driver from the ``nova_bhyve``
package.  Only this file is installed into Nova's namespace.
"""

from nova_bhyve.driver import BhyveDriver

__all__ = ["BhyveDriver"]
