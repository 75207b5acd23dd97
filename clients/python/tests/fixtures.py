"""The real parts the client's tests use: the imgconv binary, the Keystone +
Glance fixture and the Ceph test cluster that scripts/test.sh starts
(scripts/openstack-fixture.sh, scripts/ceph-cluster.sh).

IMGCONV_BINARY: the agent (default .build/debug/imgconv); IMGCONV_FIXTURE_DIR:
the Glance fixture (/tmp/imgconv-openstack); IMGCONV_CEPH_ENV: the cluster's
env file (/tmp/imgconv-ceph/env). IMGCONV_REQUIRE_OPENSTACK=1 /
IMGCONV_REQUIRE_CEPH=1 make a missing service an error, not a skip.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(
    os.path.dirname(
        os.path.dirname(
            os.path.dirname(
                os.path.abspath(__file__)))))


def read_env(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.rstrip('\n').partition('=')
                if sep:
                    out[key] = value
    except OSError:
        pass
    return out


def _answers(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError):
        return False


OPENSTACK = read_env(
    os.path.join(
        os.environ.get(
            'IMGCONV_FIXTURE_DIR',
            '/tmp/imgconv-openstack'),
        'env'))
if OPENSTACK.get('GLANCE_URL') and not _answers(
        OPENSTACK['GLANCE_URL'] + '/healthcheck'):
    OPENSTACK = {}
if not OPENSTACK and os.environ.get('IMGCONV_REQUIRE_OPENSTACK') == '1':
    raise RuntimeError(
        'IMGCONV_REQUIRE_OPENSTACK=1 but Glance is not answering: run '
        'scripts/openstack-fixture.sh start')

CEPH = read_env(os.environ.get('IMGCONV_CEPH_ENV', '/tmp/imgconv-ceph/env'))
if CEPH and subprocess.call(['ceph',
                             '-c',
                             CEPH['CEPH_CONF'],
                             '--id',
                             'admin',
                             '--keyring',
                             CEPH['CEPH_ADMIN_KEYRING'],
                             '--connect-timeout',
                             '5',
                             'health'],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL) != 0:
    CEPH = {}
if not CEPH and os.environ.get('IMGCONV_REQUIRE_CEPH') == '1':
    raise RuntimeError(
        'IMGCONV_REQUIRE_CEPH=1 but the Ceph test cluster is not answering: '
        'run scripts/ceph-cluster.sh start')


def binary():
    path = os.environ.get('IMGCONV_BINARY') or os.path.join(
        REPO, '.build', 'debug', 'imgconv')
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            '%s is not built: swift build (or set IMGCONV_BINARY)' %
            path)
    return path


# -- Keystone and Glance, as the admin of the fixture

_token = {}


def token(user='admin', password='secret', project='admin'):
    key = (user, project)
    if key in _token and time.time() - _token[key][1] < 1800:
        return _token[key][0]
    domain = {'id': 'default'}
    body = {'auth': {
        'identity': {'methods': ['password'],
                     'password': {'user': {'name': user, 'domain': domain,
                                           'password': password}}},
        'scope': {'project': {'name': project, 'domain': domain}}}}
    req = urllib.request.Request(
        OPENSTACK['KEYSTONE_URL'] +
        '/auth/tokens',
        data=json.dumps(body).encode(),
        headers={
            'Content-Type': 'application/json'},
        method='POST')
    with urllib.request.urlopen(req, timeout=60) as r:
        value = r.headers['X-Subject-Token']
    _token[key] = (value, time.time())
    return value


def glance(method, path, body=None, data=None, headers=None, retries=4):
    """A call to Glance as admin: (status, parsed JSON or None). 5xx (the
    fixture's sqlite) are retried.
    """
    h = {'X-Auth-Token': token()}
    h.update(headers or {})
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        h.setdefault('Content-Type', 'application/json')
    elif data is not None:
        payload = data
        h.setdefault('Content-Type', 'application/octet-stream')
    for attempt in range(retries):
        req = urllib.request.Request(
            OPENSTACK['GLANCE_URL'] + path,
            data=payload,
            headers=h,
            method=method)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code < 500 or attempt == retries - \
                    1 or (method == 'PUT' and path.endswith('/file')):
                try:
                    return e.code, json.loads(raw)
                except ValueError:
                    return e.code, raw.decode('utf-8', 'replace')
        time.sleep(0.25 * 2 ** attempt)


def create_image(
        data,
        disk_format='raw',
        name='imgconv-client-test',
        store=None):
    """A Glance image with these bytes; returns its id."""
    status, image = glance('POST', '/v2/images', body={
        'name': name, 'disk_format': disk_format,
        'container_format': 'bare'})
    assert status == 201, (status, image)
    headers = {'X-Image-Meta-Store': store} if store else {}
    status, err = glance(
        'PUT', '/v2/images/%s/file' %
        image['id'], data=data, headers=headers)
    assert status == 204, (status, err)
    return image['id']


def delete_image(image_id):
    glance('DELETE', '/v2/images/%s' % image_id)


def test_bytes(size, seed):
    """Data that neither compresses nor is zero, except a zero hole in the
    middle.
    """
    import random
    rnd = random.Random(seed)
    out = bytearray(rnd.getrandbits(8) for _ in range(min(size, 1 << 16)))
    while len(out) < size:
        out += out[:size - len(out)]
    hole = size // 4
    out[hole:hole * 2] = bytes(hole)
    return bytes(out)


def rbd(*args):
    return subprocess.run(['rbd',
                           '-c',
                           CEPH['CEPH_CONF'],
                           '--id',
                           'admin',
                           '--keyring',
                           CEPH['CEPH_ADMIN_KEYRING']] + list(args),
                          check=True,
                          capture_output=True).stdout


def export(spec):
    """The bytes of an RBD image, as `rbd export` gives them."""
    fd, path = tempfile.mkstemp(prefix='imgconv-export-')
    os.close(fd)
    os.unlink(path)
    try:
        rbd('export', '--no-progress', spec, path)
        with open(path, 'rb') as f:
            return f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)


# -- the agent

class Agent(object):
    """An imgconv agent in a temporary directory, on the fixture's Glance (and
    the test cluster with rbd=True).
    """

    def __init__(self, rbd=False, sections=None):
        self.dir = tempfile.mkdtemp(prefix='imgconv-pyagent-')
        self.socket = os.path.join(self.dir, 'agent.sock')
        config = {
            'agent': {
                'socket_path': self.socket,
                'state_dir': os.path.join(
                    self.dir,
                    'state')},
            'glance': {
                'auth_url': OPENSTACK['KEYSTONE_URL'],
                'username': 'admin',
                'password': 'secret',
                'project_name': 'admin',
                'num_retries': '4'},
            'cache': {
                'directory': os.path.join(
                    self.dir,
                    'cache'),
                'max_size': '2G'},
        }
        if rbd:
            config['rbd'] = {'ceph_conf': CEPH['CEPH_CONF'], 'user': CEPH.get(
                'CEPH_USER', 'imgconv'), 'keyring': CEPH['CEPH_USER_KEYRING']}
        for section, values in (sections or {}).items():
            config.setdefault(section, {}).update(values)
        self.config = os.path.join(self.dir, 'agent.conf')
        with open(self.config, 'w') as f:
            for section, values in sorted(config.items()):
                f.write('[%s]\n' % section)
                for k, v in sorted(values.items()):
                    f.write('%s = %s\n' % (k, v))
        self.log = os.path.join(self.dir, 'agent.log')
        self.process = None

    def start(self, wait=30):
        with open(self.log, 'ab') as log:
            self.process = subprocess.Popen([binary(),
                                             'agent',
                                             '--config',
                                             self.config,
                                             '--log-level',
                                             'debug'],
                                            stdout=log,
                                            stderr=log)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError('the agent exited with %s:\n%s' % (
                    self.process.returncode, self.log_text()[-3000:]))
            if os.path.exists(self.socket):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.socket)
                    return self
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.05)
        raise RuntimeError(
            'the agent did not open %s within %s s' %
            (self.socket, wait))

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self):
        try:
            with open(self.log, errors='replace') as f:
                return f.read()
        except OSError:
            return ''


def new_uuid():
    return str(uuid.uuid4())
