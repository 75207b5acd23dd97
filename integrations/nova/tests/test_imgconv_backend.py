"""images_type = imgconv on Nova 34.0.0's own code: the libvirt driver's real
root-disk path (LibvirtDriver._create_and_inject_local_root -> Backend.by_name
-> Image.cache -> create_image -> clone), libvirt_info, the driver's rbd
clean-up and cache_image, against a real agent, the Glance fixture and Ceph.

Set-up Nova's image backend needs outside nova-compute, all of it here: the
config parsed with no files and the options set below, objects.register_all(),
oslo.concurrency's lock_path, privsep run in-process (as root:
nova.privsep.sys_admin_pctxt.set_client_mode(False)), and the instance
directory made first, as the driver does.
"""

import os
import subprocess
import tempfile
import unittest
import uuid
from unittest import mock

import nova_support
from nova_support import CONF, DISK_MAPPING, fixtures

import nova
from nova import exception
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import imagebackend
from nova.virt.libvirt import imagecache
from nova.virt.libvirt import utils as libvirt_utils

from imgconv_client import Client
from imgconv_client.nova import backend as imgconv_backend

HERE = os.path.dirname(os.path.abspath(__file__))


def setUpModule():
    if not (fixtures.OPENSTACK and fixtures.CEPH):
        raise unittest.SkipTest(
            'needs the Glance fixture and the Ceph test cluster')
    nova_support.setup_nova()


class NovaBackendTest(nova_support.AgentTestCase):

    @classmethod
    def setUpClass(cls):
        cls.agent = fixtures.Agent(rbd=True).start()
        cls.instances = tempfile.mkdtemp(prefix='imgconv-nova-instances-')
        cls.images = []

    def setUp(self):
        libvirt = {
            'images_type': 'imgconv', 'images_rbd_pool': 'vms',
            'images_rbd_ceph_conf': fixtures.CEPH['CEPH_CONF'],
            'rbd_user': fixtures.CEPH.get('CEPH_USER', 'imgconv'),
            # libvirt's secret for the cephx key, as every rbd deployment
            # sets it
            'rbd_secret_uuid': '7e3ee9d6-6d2d-4cf4-9a52-3f6c2b9a1c01'}
        imgconv = {'socket_path': self.agent.socket, 'fallback': 'fail',
                   'disk_type': 'rbd', 'timeout': 300}
        nova_support.configure(self, self.instances, libvirt=libvirt,
                               imgconv=imgconv)
        self.context = nova_support.context()

    def image(self, size=(6 << 20) + 4096, seed=31):
        data = fixtures.test_bytes(size, seed=seed)
        image_id = fixtures.create_image(data, name='imgconv-nova-test')
        self.images.append(image_id)
        return image_id, data

    def instance(self, image_id):
        return nova_support.instance(image_id)

    def driver(self):
        return nova_support.driver()

    def create_root_disk(self, drv, inst, image_id):
        return nova_support.create_root_disk(drv, self.context, inst, image_id)

    def remove(self, drv, inst):
        drv._cleanup_rbd(inst)
        self.assertFalse(drv.image_backend.by_name(inst, 'disk').exists())

    def test_root_disks_are_the_agents_clones(self):
        image_id, data = self.image()
        drv = self.driver()
        self.assertIsInstance(
            drv.image_backend.by_name(
                self.instance(image_id),
                'disk'),
            imgconv_backend.ImgconvRbd)
        self.assertEqual(libvirt_utils.images_type(), 'rbd')

        first = self.instance(image_id)
        created, fetches = self.create_root_disk(drv, first, image_id)
        self.assertTrue(created)
        self.assertEqual(fetches, 0, "Nova's fetch_image was called")
        disk = fixtures.export('vms/%s_disk' % first.uuid)
        # the flavor's root_gb, made by the agent
        self.assertEqual(len(disk), 1 << 30)
        self.assertEqual(disk[:len(data)], data)
        self.assertEqual(disk[len(data):].count(0), len(disk) - len(data))
        agent = Client(self.agent.socket)
        self.assertEqual(
            agent.disk_get(
                first.uuid)['parent'],
            'vms/imgconv-base-%s@imgconv' %
            image_id)

        # libvirt sees the disk images_type = rbd gives it.
        ours = drv.image_backend.by_name(
            first, 'disk', disk_info_mapping=DISK_MAPPING['disk'])
        nova_rbd = imagebackend.Rbd(
            instance=first,
            disk_name='disk',
            disk_info_mapping=DISK_MAPPING['disk'])
        self.assertEqual(
            ours.libvirt_info(
                'none', {}).to_xml(), nova_rbd.libvirt_info(
                'none', {}).to_xml())
        self.assertIn(
            "protocol=\"rbd\" name=\"vms/%s_disk\"" %
            first.uuid, ours.libvirt_info(
                'none', {}).to_xml())

        # The second instance is a clone of the same base, made as fast as a
        # clone is.
        second = self.instance(image_id)
        created, fetches = self.create_root_disk(drv, second, image_id)
        self.assertEqual(fetches, 0)
        self.assertEqual(
            agent.disk_get(
                second.uuid)['parent'],
            'vms/imgconv-base-%s@imgconv' %
            image_id)
        self.assertEqual(
            fixtures.export(
                'vms/%s_disk' %
                second.uuid)[
                :len(data)],
            data)
        # Cached again (a reboot, a second cache() call): nothing is made
        # twice.
        created, fetches = self.create_root_disk(drv, second, image_id)
        self.assertFalse(created)

        # Deleting the instances through the driver's rbd clean-up removes the
        # disks, and the agent's GC then finds the base unused.
        for inst in (first, second):
            self.remove(drv, inst)
        self.assertEqual(
            agent.collect_bases(
                idle=0, images=[image_id]), [
                'imgconv-base-%s' %
                image_id])

    def test_novas_rbd_operations_work_on_the_agents_disk(self):
        # What resize, resize-revert, unshelve and rescue do with the root
        # disk, through Nova's Rbd code on the disk the agent made.
        image_id, data = self.image(size=(2 << 20) + 4096, seed=36)
        drv = self.driver()
        inst = self.instance(image_id)
        self.create_root_disk(drv, inst, image_id)
        disk = drv.image_backend.by_name(
            inst, 'disk', disk_info_mapping=DISK_MAPPING['disk'])
        self.assertEqual(disk.get_disk_size(disk.path), 1 << 30)
        # resize: Nova grows the disk (Rbd.resize_image).
        disk.resize_image(2 << 30)
        self.assertEqual(disk.get_disk_size(disk.path), 2 << 30)
        # resize-revert: a snapshot before, a rollback after.
        disk.create_snap(libvirt_utils.RESIZE_SNAPSHOT_NAME)
        fixtures.rbd('resize', '--no-progress', '--size', '3G',
                     'vms/%s_disk' % inst.uuid)
        disk.rollback_to_snap(libvirt_utils.RESIZE_SNAPSHOT_NAME)
        disk.remove_snap(libvirt_utils.RESIZE_SNAPSHOT_NAME)
        self.assertEqual(disk.get_disk_size(disk.path), 2 << 30)
        # unshelve / cross-cell: flatten (the disk no longer needs its base).
        disk.flatten()
        self.assertNotIn('parent', Client(self.agent.socket).disk_get(
            inst.uuid))
        self.assertEqual(fixtures.export(
            'vms/%s_disk' % inst.uuid)[:len(data)], data)
        # rescue: disk.rescue is Nova's own (only the root disk is the
        # agent's): Nova's path makes it.
        mapping = dict(DISK_MAPPING, **{'disk.rescue': DISK_MAPPING['disk']})
        with mock.patch.object(libvirt_utils, 'fetch_image',
                               wraps=libvirt_utils.fetch_image) as fetch:
            drv._create_and_inject_local_root(
                self.context, inst, mapping, False, '.rescue',
                {'image_id': image_id}, None, None)
        self.assertEqual(fetch.call_count, 1)
        self.assertEqual(fixtures.export(
            'vms/%s_disk.rescue' % inst.uuid)[:len(data)], data)
        self.remove(drv, inst)
        self.assertRaises(subprocess.CalledProcessError, fixtures.rbd,
                          'info', 'vms/%s_disk.rescue' % inst.uuid)
        base = os.path.join(self.instances, '_base',
                            imagecache.get_cache_fname(image_id))
        if os.path.exists(base):
            os.unlink(base)

    def test_agent_down_fallback_nova_boots_through_novas_path(self):
        image_id, data = self.image(seed=32)
        CONF.set_override(
            'socket_path',
            '/nonexistent/imgconv.sock',
            group='imgconv')
        CONF.set_override('fallback', 'nova', group='imgconv')
        drv = self.driver()
        inst = self.instance(image_id)
        created, fetches = self.create_root_disk(drv, inst, image_id)
        self.assertTrue(created)
        self.assertEqual(fetches, 1, "Nova's own path did not run")
        self.assertEqual(
            fixtures.export(
                'vms/%s_disk' %
                inst.uuid)[
                :len(data)],
            data)
        self.remove(drv, inst)
        base = os.path.join(
            self.instances,
            CONF.image_cache.subdirectory_name,
            imagecache.get_cache_fname(image_id))
        if os.path.exists(base):
            os.unlink(base)

    def test_agent_down_fallback_fail_is_a_clear_error(self):
        image_id, _ = self.image(size=1 << 20, seed=33)
        CONF.set_override(
            'socket_path',
            '/nonexistent/imgconv.sock',
            group='imgconv')
        drv = self.driver()
        inst = self.instance(image_id)
        with mock.patch.object(libvirt_utils, 'fetch_image') as fetch:
            with self.assertRaises(imgconv_backend.AgentUnavailable) as cm:
                drv._create_and_inject_local_root(
                    self.context, inst, DISK_MAPPING, False, '', {
                        'image_id': image_id}, None, None)
        self.assertEqual(fetch.call_count, 0)
        self.assertIn('/nonexistent/imgconv.sock', str(cm.exception))
        self.assertIn('fallback = nova', str(cm.exception))
        self.assertFalse(drv.image_backend.by_name(inst, 'disk').exists())

    def test_cache_image_asks_the_agent(self):
        # What Nova's aggregate image pre-cache API (POST
        # /os-aggregates/{id}/images) calls on each node.
        image_id, data = self.image(size=2 << 20, seed=34)
        drv = self.driver()
        with mock.patch.object(libvirt_driver.images,
                               'fetch_to_raw') as nova_fetch:
            self.assertTrue(drv.cache_image(self.context, image_id))
            self.assertFalse(
                drv.cache_image(
                    self.context,
                    image_id))   # already cached
        self.assertEqual(nova_fetch.call_count, 0)
        cached = Client(self.agent.socket).image(image_id)
        self.assertEqual(cached['state'], 'ready')
        with open(cached['path'], 'rb') as f:
            self.assertEqual(f.read(), data)
        with self.assertRaises(exception.ImageNotFound):
            drv.cache_image(self.context, str(uuid.uuid4()))


class NovaQcow2BackendTest(NovaBackendTest):
    """disk_type = qcow2 (no Ceph): the agent makes the qcow2 overlay
    <instances_path>/<uuid>/disk on its raw base, where Nova's Qcow2 backend
    would have put it.
    """

    @classmethod
    def setUpClass(cls):
        cls.instances = tempfile.mkdtemp(prefix='imgconv-nova-instances-')
        cls.agent = fixtures.Agent(
            sections={
                'disks': {
                    'instances_dir': cls.instances}}).start()
        cls.images = []

    def setUp(self):
        super().setUp()
        CONF.set_override('disk_type', 'qcow2', group='imgconv')

    def test_root_disks_are_the_agents_clones(self):
        image_id, data = self.image(seed=35)
        drv = self.driver()
        self.assertEqual(libvirt_utils.images_type(), 'qcow2')
        inst = self.instance(image_id)
        self.assertIsInstance(drv.image_backend.by_name(
            inst, 'disk'), imgconv_backend.ImgconvQcow2)
        created, fetches = self.create_root_disk(drv, inst, image_id)
        self.assertTrue(created)
        self.assertEqual(fetches, 0, "Nova's fetch_image was called")
        disk = os.path.join(libvirt_utils.get_instance_path(inst), 'disk')
        info = nova_support.qemu_img_info(disk)
        self.assertIn('"format": "qcow2"', info)
        self.assertIn(
            os.path.join(
                self.instances,
                '_base',
                image_id),
            info)
        self.assertIn('"virtual-size": %d' % (1 << 30), info)
        self.assertEqual(nova_support.raw_of(disk)[:len(data)], data)
        # libvirt sees the file disk Nova's Qcow2 backend gives it.
        xml = drv.image_backend.by_name(
            inst, 'disk', disk_info_mapping=DISK_MAPPING['disk']).libvirt_info(
            'none', {}).to_xml()
        self.assertIn('file="%s"' % disk, xml)
        self.assertIn('type="qcow2"', xml)
        Client(self.agent.socket).disk_delete(inst.uuid)
        self.assertFalse(os.path.exists(disk))

    def test_agent_down_fallback_nova_boots_through_novas_path(self):
        self.skipTest('the rbd case covers the fallback')

    def test_novas_rbd_operations_work_on_the_agents_disk(self):
        self.skipTest('rbd only')

    def test_cache_image_asks_the_agent(self):
        self.skipTest('the rbd case covers cache_image')


class PatchTest(unittest.TestCase):
    def test_the_patch_is_applied_to_the_installed_nova(self):
        patch = os.path.join(HERE, '..', 'nova-34.0.0-imgconv.patch')
        site = os.path.dirname(os.path.dirname(nova.__file__))
        with open(patch, 'rb') as f:
            r = subprocess.run(['patch',
                                '-p1',
                                '-d',
                                site,
                                '--dry-run',
                                '-R',
                                '-s',
                                '-f'],
                               stdin=f,
                               capture_output=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        import importlib.metadata
        self.assertEqual(importlib.metadata.version('nova'), '34.0.0')


if __name__ == '__main__':
    unittest.main()
