"""The base class of the Nova scenario scripts (``nova_*_scenarios.py``).

Nova's in-process control plane with computes running
``bhyve.BhyveDriver`` on the KVM test host.  This module imports nova, so
a script imports it only after ``nova_scenarios.select_mode`` (see
``nova_scenarios``); pytest does not collect it.
"""

import io
import os
import shutil
import sys
import tempfile
import uuid as uuidlib
import warnings
from unittest import mock

from nova.tests.functional import integrated_helpers
from polling import wait_for
from sqlalchemy import exc as sqla_exc

from nova import utils

IMAGE_DATA = bytes(range(256)) * 256            # 64 KiB, a raw "disk"
NODE_NS = uuidlib.UUID("6f1c3b2a-9d8e-4f70-a1b2-c3d4e5f60718")


class BhyveScenarioTest(integrated_helpers.ProviderUsageBaseTestCase):
    """Computes ``HOSTS`` on BhyveDriver, a 128 MiB flavor, ``IMAGES``.

    ``self.base`` is a short folder under /tmp (unix sockets live in the
    runtime directories) holding each host's instances directory and its
    runtime directory ``run-<host>`` ([bhyve] runtime_path), or with
    ``SHARED_INSTANCES`` one instances directory ``shared`` for all hosts
    (an NFS-mounted instances_path, as far as one machine can tell);
    ``self.drivers`` and ``self.compute_services`` map host names to the
    computes' drivers and services.
    """

    compute_driver = "bhyve.BhyveDriver"
    HOSTS = ("host1",)
    IMAGES = {}                 # image id -> bhyve_testhost_cmdline
    TMP_PREFIX = "nbs-"
    BHYVE_FLAGS = {}            # [bhyve] options besides state_poll_interval
    SHARED_INSTANCES = False    # one instances directory for every host
    WAIT_TIMEOUT = 30.0         # _wait's defaults
    WAIT_INTERVAL = 0.1

    def setUp(self):
        self.base = tempfile.mkdtemp(prefix=self.TMP_PREFIX, dir="/tmp")
        self.addCleanup(shutil.rmtree, self.base, True)
        # pip installs nova's paste config as data under the prefix
        paste = os.path.join(sys.prefix, "etc", "nova", "api-paste.ini")
        if os.path.exists(paste):
            self.flags(api_paste_config=paste, group="wsgi")
        self.flags(state_poll_interval=0.5, group="bhyve", **self.BHYVE_FLAGS)
        super().setUp()
        # nova 34 still calls noload(), which SQLAlchemy 2.1 deprecates;
        # nova's WarningsFixture would turn that warning into an error
        warnings.filterwarnings("ignore", message=r"The noload\(\) option",
                                category=sqla_exc.SADeprecationWarning)
        # the mode nova_scenarios.select_mode chose is the one nova runs in
        self.assertEqual(os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] == "1",
                         utils.concurrency_mode_threading())
        self.drivers, self.compute_services = {}, {}
        for host in self.HOSTS:
            self._start_bhyve_compute(host)
        self.addCleanup(self._kill_leftovers)
        self.flavor_id = self._create_flavor(memory_mb=128, vcpu=1, disk=0,
                                             ephemeral=0)
        for image_id, cmdline in self.IMAGES.items():
            self.glance.create(None, {
                "id": image_id, "name": cmdline, "status": "active",
                "disk_format": "raw", "container_format": "bare",
                "min_ram": 0, "min_disk": 0, "size": len(IMAGE_DATA),
                "properties": {"bhyve_testhost_cmdline": cmdline},
            }, data=io.BytesIO(IMAGE_DATA))

    def _start_bhyve_compute(self, host):
        """Start ``host`` with its own instances directory and node UUID."""
        self.flags(instances_path=os.path.join(
            self.base, "shared" if self.SHARED_INSTANCES else host))
        self.flags(runtime_path=os.path.join(self.base, "run-" + host),
                   group="bhyve")
        node = str(uuidlib.uuid5(NODE_NS, host))
        with mock.patch("nova.virt.node.get_local_node_uuid",
                        return_value=node):
            compute = self._start_compute(host)
        self.drivers[host] = compute.driver
        self.compute_services[host] = compute
        return compute

    def _kill_leftovers(self):
        for drv in self.drivers.values():
            for uuid in drv.backend.list_machines():
                drv.backend.destroy(uuid)

    def _wait(self, predicate, what, timeout=None, interval=None):
        """wait_for with this class's default timeout and interval."""
        return wait_for(predicate,
                        self.WAIT_TIMEOUT if timeout is None else timeout,
                        self.WAIT_INTERVAL if interval is None else interval,
                        what)
