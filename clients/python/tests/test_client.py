"""The Python client against a real agent on the real Glance (and Ceph): every
call, every documented error class the fixtures can provoke, and every answer
validated against the agent's own OpenAPI document.
"""

import hashlib
import os
import socket
import threading
import time
import unittest

from imgconv_client import Client, errors
from imgconv_client.client import _UnixConnection

import contract
import fixtures


@unittest.skipUnless(fixtures.OPENSTACK, 'the Glance fixture is not running '
                     '(scripts/openstack-fixture.sh start)')
class ClientTest(unittest.TestCase):
    """One agent for the class; each test makes its own images and disks."""

    @classmethod
    def setUpClass(cls):
        cls.agent = fixtures.Agent(rbd=bool(fixtures.CEPH)).start()
        cls.document = Client(cls.agent.socket).openapi()
        cls.recorder = contract.Recorder(cls.document)
        cls.client = Client(
            cls.agent.socket,
            timeout=60,
            response_hook=cls.recorder)
        assert cls.client.openapi() == cls.document
        cls.images = []

    @classmethod
    def tearDownClass(cls):
        cls.agent.close()
        for image_id in cls.images:
            fixtures.delete_image(image_id)

    def tearDown(self):
        # Whatever a test did, every answer so far matched the document.
        self.recorder.check()

    def image_with(self, data, disk_format='raw'):
        image_id = fixtures.create_image(data, disk_format=disk_format)
        self.images.append(image_id)
        return image_id

    def test_health_metrics_and_the_document(self):
        health = self.client.health()
        self.assertEqual(health['status'], 'ok')
        self.assertIn('imgconv_', self.client.metrics())
        self.assertEqual(self.document['openapi'], '3.1.0')
        enum = set(self.document['components']['schemas']['ErrorType']['enum'])
        self.assertEqual(enum, set(errors.BY_TYPE), 'the client has one '
                         'exception class per documented error type')

    def test_fetch_pin_evict_verify(self):
        data = fixtures.test_bytes(3 << 20, seed=11)
        image_id = self.image_with(data)
        self.assertRaises(errors.ImageNotCached, self.client.image, image_id)
        image = self.client.fetch(image_id, wait=True, timeout=120)
        self.assertEqual(image['state'], 'ready')
        with open(image['path'], 'rb') as f:
            self.assertEqual(
                hashlib.sha256(
                    f.read()).digest(),
                hashlib.sha256(data).digest())
        # Cached now: fetch answers the image at once, without waiting.
        self.assertEqual(
            self.client.fetch(
                image_id,
                wait=False)['state'],
            'ready')
        self.assertIn(image_id, [i['id'] for i in self.client.images()])
        self.assertTrue(self.client.pin(image_id)['pinned'])
        with self.assertRaises(errors.Busy) as cm:
            self.client.evict(image_id)
        self.assertEqual(cm.exception.code, 409)
        self.assertIn('pinned', str(cm.exception))
        self.assertFalse(self.client.unpin(image_id)['pinned'])
        self.assertTrue(self.client.verify(image_id)['ok'])
        # A file changed behind the agent's back: verify says so (422, not an
        # error) and removes it.
        with open(image['path'], 'r+b') as f:
            f.seek(1000)
            f.write(b'\x42' if data[1000:1001] != b'\x42' else b'\x43')
        verdict = self.client.verify(image_id)
        self.assertFalse(verdict['ok'])
        self.assertEqual(self.client.image(image_id)['state'], 'error')
        self.assertFalse(os.path.exists(image['path']))
        # Fetched again, then evicted.
        self.assertEqual(
            self.client.fetch(
                image_id,
                timeout=120)['state'],
            'ready')
        self.client.evict(image_id)
        self.assertRaises(errors.ImageNotCached, self.client.image, image_id)
        self.assertRaises(errors.ImageNotCached, self.client.evict, image_id)

    def test_fetch_without_waiting_is_a_job(self):
        image_id = self.image_with(fixtures.test_bytes(2 << 20, seed=12))
        job = self.client.fetch(image_id, wait=False)
        self.assertEqual(job['image_id'], image_id)
        self.assertEqual(job['kind'], 'fetch')
        self.assertEqual(self.client.job(job['id'])['id'], job['id'])
        self.assertIn(job['id'], [j['id'] for j in self.client.jobs()])
        self.assertEqual(
            self.client.fetch(
                image_id,
                timeout=120)['state'],
            'ready')

    def test_a_hostile_image_fails_the_fetch(self):
        # A qcow2 registered as raw (CVE-2024-40767): Glance accepts it, the
        # agent inspects and refuses it and never makes it ready. (Glance 33
        # itself refuses a qcow2 with a backing file at upload.)
        sample = os.path.join(fixtures.REPO, 'samples', 'qcow2-v3.qcow2')
        with open(sample, 'rb') as f:
            image_id = self.image_with(f.read(), disk_format='raw')
        with self.assertRaises(errors.FetchFailed) as cm:
            self.client.fetch(image_id, timeout=120)
        self.assertIn('format-mismatch', str(cm.exception))
        self.assertEqual(self.client.image(image_id)['state'], 'error')

    def test_errors_are_typed(self):
        with self.assertRaises(errors.InvalidRequest) as cm:
            self.client.image('../../etc/passwd')
        self.assertEqual(cm.exception.code, 400)
        self.assertRaises(errors.InvalidRequest, self.client.job, 'not-a-job')
        self.assertRaises(
            errors.NotFound,
            self.client.job,
            fixtures.new_uuid())
        self.assertRaises(
            errors.ImageNotFound,
            self.client.fetch,
            fixtures.new_uuid())
        self.assertRaises(
            errors.DiskNotFound,
            self.client.disk_get,
            fixtures.new_uuid())
        self.assertRaises(errors.InvalidRequest, self.client.disk_get, 'vda')
        self.assertRaises(
            errors.InvalidRequest,
            self.client.disk_create,
            'not-a-uuid',
            fixtures.new_uuid())
        self.assertRaises(
            errors.InvalidRequest,
            self.client.collect_bases,
            idle=-1)
        # What the client itself never sends: an unknown route (not in the
        # document: no recorder), a body over 64 KiB.
        self.assertRaises(
            errors.NotFound,
            Client(
                self.agent.socket)._request,
            'GET',
            '/v1/nothing-here')
        with self.assertRaises(errors.BodyTooLarge) as cm:
            self.client._request(
                'POST',
                '/v1/disks',
                body={
                    'instance_uuid': 'x' *
                    70000})
        self.assertEqual(cm.exception.code, 413)

    def test_agent_down_and_timeouts(self):
        gone = Client('/nonexistent/agent.sock', timeout=2)
        with self.assertRaises(errors.AgentUnavailable) as cm:
            gone.health()
        self.assertIn('/nonexistent/agent.sock', str(cm.exception))
        # A listener that accepts and never answers: the call ends at its
        # timeout.
        path = os.path.join(self.agent.dir, 'silent.sock')
        silent = socket.socket(socket.AF_UNIX)
        silent.bind(path)
        silent.listen(1)
        try:
            started = time.monotonic()
            self.assertRaises(errors.Timeout, Client(path, timeout=0.5).health)
            self.assertLess(time.monotonic() - started, 5)
        finally:
            silent.close()

    def test_events_stream_job_changes(self):
        image_id = self.image_with(fixtures.test_bytes(1 << 20, seed=13))
        seen = []
        done = threading.Event()

        def listen():
            try:
                for event in Client(
                        self.agent.socket,
                        response_hook=self.recorder).events(
                        timeout=60):
                    if event.get('image_id') == image_id:
                        seen.append(event['state'])
                        if event['state'] in ('ready', 'error'):
                            return
            finally:
                done.set()

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        time.sleep(0.5)  # subscribed before the fetch starts
        self.client.fetch(image_id, timeout=120)
        self.assertTrue(done.wait(60))
        self.assertEqual(seen[-1], 'ready', seen)
        self.assertIn('fetching', seen)

    @unittest.skipUnless(fixtures.CEPH, 'the Ceph test cluster is not running')
    def test_disks(self):
        data = fixtures.test_bytes((4 << 20) + 512, seed=14)
        image_id = self.image_with(data)
        first, second = fixtures.new_uuid(), fixtures.new_uuid()
        disk = self.client.disk_create(first, image_id, timeout=300)
        self.assertEqual(disk['name'], first + '_disk')
        self.assertEqual(disk['method'], 'base-built')
        self.assertEqual(fixtures.export(disk['location']), data)
        self.assertRaises(
            errors.DiskExists,
            self.client.disk_create,
            first,
            image_id)
        with self.assertRaises(errors.InvalidRequest) as cm:
            self.client.disk_create(second, image_id, size=4096)
        self.assertIn('virtual size', str(cm.exception))
        # The second instance, without waiting: a job, then the disk (a clone
        # of the same base).
        job = self.client.disk_create(
            second, image_id, size=8 << 20, wait=False)
        self.assertEqual(job['kind'], 'disk')
        for _ in range(600):
            if self.client.job(job['id'])['state'] in ('ready', 'error'):
                break
            time.sleep(0.1)
        self.assertEqual(self.client.job(job['id'])['state'], 'ready')
        clone = self.client.disk_get(second)
        self.assertEqual(clone['size'], 8 << 20)
        self.assertEqual(clone['parent'], disk['parent'])
        self.assertIn(first + '_disk', [d['name']
                      for d in self.client.disks()['disks']])
        flat = self.client.disk_flatten(second)
        self.assertNotIn('parent', flat)
        for instance in (first, second):
            self.client.disk_delete(instance)
            self.assertRaises(
                errors.DiskNotFound,
                self.client.disk_get,
                instance)
        removed = self.client.collect_bases(idle=0, images=[image_id])
        self.assertEqual(removed, ['imgconv-base-' + image_id])

    def test_the_recorder_catches_what_the_document_does_not_allow(self):
        r = contract.Recorder(self.document)
        r('GET', '/v1/health', 200, 'application/json',
          {'status': 'ok'})                     # fields missing
        r('GET', '/v1/images/%s' % fixtures.new_uuid(), 418,
          'application/json', {})          # undocumented status
        # a body where none is
        r('DELETE', '/v1/disks/x_disk', 204, '', 'unexpected')
        r('GET', '/v1/disks', 200, 'application/json',
          {'backend': 'nfs', 'disks': []})        # not in the enum
        r('GET', '/v1/nothing', 200, 'application/json', {}
          )                                  # no such operation
        r('GET',
          '/v1/health',
          200,
          'application/json',
          {'status': 'ok',
           'cache_bytes': 1,
           'cache_max_bytes': 2,
           'extra': True})  # an undocumented field
        self.assertEqual(len(r.problems), 6, '\n'.join(r.problems))
        self.assertRaises(contract.ContractError, r.check)

    def test_zz_every_documented_operation_was_called(self):
        # Runs last (unittest orders by name): the calls of every other test
        # are in the recorder.
        operations = self.recorder.operations()
        if not fixtures.CEPH:
            operations = {(m, t) for m, t in operations if not t.startswith(
                ('/v1/disks', '/v1/bases'))}
        called = {(m, t) for m, t, _ in self.recorder.seen}
        self.assertEqual(
            operations - called,
            set(),
            'documented operations no test called')


class UnixConnectionTest(unittest.TestCase):
    def test_it_speaks_http_over_a_unix_socket(self):
        import tempfile
        path = tempfile.mktemp(prefix='imgconv-client-', suffix='.sock')
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        got = []

        def serve():
            conn, _ = server.accept()
            got.append(conn.recv(65536))
            conn.sendall(b'HTTP/1.1 200 OK\r\n'
                         b'Content-Type: application/json\r\n'
                         b'Content-Length: 2\r\n\r\n{}')
            conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            c = _UnixConnection(path, 5)
            c.request('GET', '/v1/health')
            r = c.getresponse()
            self.assertEqual((r.status, r.read()), (200, b'{}'))
            self.assertTrue(got[0].startswith(b'GET /v1/health HTTP/1.1\r\n'))
            c.close()
        finally:
            server.close()
            os.unlink(path)

    def test_an_answer_without_the_error_body_is_a_protocol_error(self):
        e = Client._error(500, 'oops', 'GET', '/x')
        self.assertIsInstance(e, errors.ProtocolError)
        busy = {'error': {'code': 409, 'type': 'busy', 'message': 'in use'}}
        e = Client._error(409, busy, 'GET', '/x')
        self.assertIsInstance(e, errors.Busy)
        self.assertIsInstance(e, errors.Conflict)
        teapot = {'error': {'code': 418, 'type': 'teapot', 'message': '?'}}
        e = Client._error(418, teapot, 'GET', '/x')
        self.assertIsInstance(e, errors.ProtocolError)


if __name__ == '__main__':
    unittest.main()
