"""Machine layers (backends) that run guests for the driver.

``load_backend`` picks one from ``[bhyve] backend``: ``bhyve`` on FreeBSD,
the KVM ``testhost`` on Linux.  Modules here import no backend eagerly so
that the supervisor process stays light.
"""


def load_backend(conf, instances_path):
    """Return the Backend selected by ``[bhyve] backend``."""
    from nova_bhyve.conf import default_backend

    name = conf.bhyve.backend
    if name == "auto":
        name = default_backend()
    if name == "bhyve":
        from nova_bhyve.machine.bhyve import BhyveBackend
        return BhyveBackend(conf, instances_path)
    from nova_bhyve.machine.testhost import TestHostBackend
    return TestHostBackend(conf, instances_path)
