"""Glance images cached on the host, and instance disks made from them."""

import hashlib
import os
import shutil

from oslo_concurrency import lockutils
from oslo_log import log as logging

from nova.virt import images as nova_images
from nova_bhyve.machine.base import MachineError

LOG = logging.getLogger(__name__)


def qemu_img_available():
    """Return True if qemu-img (needed to convert qcow2) is installed."""
    return shutil.which("qemu-img") is not None


def cache_name(image_id):
    """Return the cache file name of a Glance image (as libvirt's _base)."""
    return hashlib.sha1(image_id.encode()).hexdigest()


def fetch_raw(context, image_id, path):
    """Download a Glance image to ``path`` as raw, checking its format.

    qcow2 images are converted with qemu-img after nova's safety checks
    (no backing or data files); without qemu-img only raw is accepted.
    """
    if qemu_img_available():
        nova_images.fetch_to_raw(context, image_id, path)
        return
    tmp = path + ".part"
    nova_images.fetch(context, image_id, tmp)
    try:
        meta = nova_images.get_info(context, image_id)
        fmt = nova_images.do_image_deep_inspection(meta, image_id, tmp)
        if fmt != "raw":
            raise MachineError(
                f"image {image_id} is {fmt}: install qemu-img to convert "
                "it, or upload a raw image")
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class FileImageCache:
    """Raw copies of Glance images under ``<instances_path>/_base``."""

    def __init__(self, base_dir):
        self.base_dir = base_dir

    def get(self, context, image_id):
        """Return the path of the cached raw image, downloading it once."""
        os.makedirs(self.base_dir, exist_ok=True)
        path = os.path.join(self.base_dir, cache_name(image_id))
        with lockutils.lock("nova-bhyve-image-" + cache_name(image_id)):
            if not os.path.exists(path):
                LOG.info("Caching image %s in %s", image_id, path)
                fetch_raw(context, image_id, path)
        return path
