"""The ``[imgconv]`` options of nova.conf."""

from oslo_config import cfg

imgconv_group = cfg.OptGroup(
    'imgconv',
    title='imgconv agent',
    help="""
The imgconv agent on this compute node makes instance root disks when
``[libvirt] images_type = imgconv``: with Ceph an RBD clone
``<images_rbd_pool>/<instance_uuid>_disk`` (the same disk ``images_type = rbd``
gives libvirt), without Ceph a qcow2 overlay on the agent's raw base.
""")

imgconv_opts = [
    cfg.StrOpt(
        'socket_path',
        default='/run/imgconv/agent.sock',
        help='The agent\'s control socket ([agent] socket_path in its '
             'config).'),
    cfg.FloatOpt(
        'timeout',
        default=1800.0,
        min=1.0,
        help="""
Seconds a root disk may take. The first instance of an image downloads,
verifies and converts it; every later one is a clone.
"""),
    cfg.StrOpt(
        'fallback',
        default='fail',
        choices=[
            ('fail',
             'The build fails with an error naming the agent '
             'and what went wrong.'),
            ('nova',
             'Nova makes the disk its own way (download, '
             'convert, rbd import), as with images_type = rbd '
             'or qcow2.'),
        ],
        help='What to do when the agent is not answering or cannot '
        'make the disk.'),
    cfg.StrOpt(
        'disk_type',
        default='rbd',
        choices=[
            ('rbd',
             'RBD clones in [libvirt] images_rbd_pool; the '
             'agent has an [rbd] section for the same pool.'),
            ('qcow2',
             'qcow2 overlays in instances_path; the agent '
             'has no [rbd] section and [disks] instances_dir '
             '= instances_path.'),
        ],
        help='Which disks the agent makes; the rest of the libvirt '
        'driver treats them as images_type = rbd or qcow2 disks.'),
]


def register_opts(conf):
    conf.register_group(imgconv_group)
    conf.register_opts(imgconv_opts, group=imgconv_group)


def list_opts():
    return {imgconv_group: imgconv_opts}
