"""Root disks through Nova 34.0.0's own code.

images_type = rbd (Nova downloads, converts with qemu-img and runs rbd
import) against images_type = imgconv (the agent makes the disk), both
through LibvirtDriver._create_and_inject_local_root on the same kind of image,
fresh uploads for each path and run.

Run by bench/nova.sh with the Nova venv's python: nova_boot.py RUNS IMAGE
(IMAGE: a qcow2 file). Prints a table of medians and ratios.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'integrations', 'nova', 'tests'))

import nova_support  # noqa: E402
from nova_support import CONF, fixtures  # noqa: E402

from nova.virt.libvirt import imagecache  # noqa: E402

from imgconv_client import Client, errors  # noqa: E402


class Bench(object):
    def __init__(self, image_path):
        with open(image_path, 'rb') as f:
            self.data = f.read()
        self.instances = tempfile.mkdtemp(prefix='imgconv-bench-nova-')
        self.agent = fixtures.Agent(rbd=True, sections={
            'cache': {'max_size': '16G'}}).start()
        self.client = Client(self.agent.socket)
        self.addCleanup = lambda *a: None
        self.images = []

    def configure(self, images_type):
        CONF.reset()
        libvirt = {'images_type': images_type, 'images_rbd_pool': 'vms',
                   'images_rbd_ceph_conf': fixtures.CEPH['CEPH_CONF'],
                   'rbd_user': fixtures.CEPH.get('CEPH_USER', 'imgconv')}
        imgconv = {'socket_path': self.agent.socket, 'timeout': 1800}
        nova_support.configure(self, self.instances, libvirt=libvirt,
                               imgconv=imgconv)

    def boot(self, images_type, image_id):
        """Seconds for one root disk, and how often Nova fetched."""
        self.configure(images_type)
        inst = nova_support.instance(image_id, root_gb=2)
        drv = nova_support.driver()
        started = time.monotonic()
        _, fetches = nova_support.create_root_disk(
            drv, nova_support.context(), inst, image_id)
        return time.monotonic() - started, fetches, drv, inst

    def run(self, images_type):
        image_id = fixtures.create_image(self.data, disk_format='qcow2',
                                         name='imgconv-bench-nova')
        self.images.append(image_id)
        first, f1, drv, a = self.boot(images_type, image_id)
        second, f2, _, b = self.boot(images_type, image_id)
        for inst in (a, b):
            drv._cleanup_rbd(inst)
        base = os.path.join(self.instances, '_base',
                            imagecache.get_cache_fname(image_id))
        if os.path.exists(base):
            os.unlink(base)
        if images_type == 'imgconv':
            self.client.collect_bases(idle=0, images=[image_id])
            try:
                self.client.evict(image_id)
            except errors.ImageNotCached:
                pass  # the base was streamed from Glance, nothing cached
        fixtures.delete_image(image_id)
        return first, second, f1 + f2

    def close(self):
        self.agent.close()
        shutil.rmtree(self.instances, ignore_errors=True)


def main(runs, image_path):
    nova_support.setup_nova()
    bench = Bench(image_path)
    times = {'rbd': ([], []), 'imgconv': ([], [])}
    try:
        for i in range(runs + 1):
            # Alternate which path goes first; run 0 is a warm-up.
            order = ('rbd', 'imgconv') if i % 2 else ('imgconv', 'rbd')
            for kind in order:
                os.sync()
                first, second, fetches = bench.run(kind)
                expected = 0 if kind == 'imgconv' else 1
                assert fetches == expected, (kind, fetches)
                if i:
                    times[kind][0].append(first)
                    times[kind][1].append(second)
    finally:
        bench.close()
    med = {k: (statistics.median(v[0]), statistics.median(v[1]))
           for k, v in times.items()}
    print('image: %s (%d bytes, qcow2); medians of %d, alternating order'
          % (os.path.basename(image_path), len(bench.data), runs))
    print('| Nova 34.0.0 root disk | images_type = rbd (s) '
          '| images_type = imgconv (s) | rbd / imgconv |')
    print('|---|---|---|---|')
    for i, name in enumerate(('first instance', 'second instance')):
        print('| %s | %.3f | %.3f | %.1fx |'
              % (name, med['rbd'][i], med['imgconv'][i],
                 med['rbd'][i] / med['imgconv'][i]))
    for kind, (a, b) in times.items():
        print('%s runs: first %s; second %s'
              % (kind, ' '.join('%.3f' % x for x in a),
                 ' '.join('%.3f' % x for x in b)))


if __name__ == '__main__':
    main(int(sys.argv[1]), sys.argv[2])
