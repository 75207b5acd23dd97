"""The imgconv agent's control API over its Unix socket (api/openapi.yaml).

Standard library only. Every call opens one HTTP/1.1 connection to the socket,
sends one request and closes it: the agent closes idle connections anyway, and
a compute service calls it a few times per boot.
"""

import http.client
import json
import socket
import time
import urllib.parse

from imgconv_client import errors

DEFAULT_SOCKET = '/run/imgconv/agent.sock'

#: How long a disk build may take when the caller gives no timeout (a first
#: instance downloads and converts).
DEFAULT_DISK_TIMEOUT = 1800.0


class _UnixConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a Unix socket."""

    def __init__(self, path, timeout):
        super().__init__('localhost', timeout=timeout)
        self._socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _quote(value):
    return urllib.parse.quote(str(value), safe='')


def disk_name(instance):
    """``<instance_uuid>_disk`` for an instance uuid; a disk name is returned
    as it is.
    """
    instance = str(instance)
    return instance if instance.endswith('_disk') else instance + '_disk'


class Client(object):
    """A client of one agent.

    :param socket_path: the agent's ``[agent] socket_path``.
    :param timeout: seconds for a call to connect and answer (a disk build has
    its own, longer timeout).
    :param response_hook: called as ``hook(method, path, status, content_type,
    body)`` after every answer
        (``body`` parsed JSON, or text); for logging and for the contract
        tests.
    """

    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=30.0,
                 response_hook=None):
        self.socket_path = socket_path
        self.timeout = timeout
        self.response_hook = response_hook

    # -- transport

    def _connect(self, timeout):
        return _UnixConnection(self.socket_path, timeout)

    def _request(self, method, path, body=None, timeout=None, ok=(200,)):
        """One request; returns ``(status, body)`` for a status in ``ok``,
        raises the documented error else.
        """
        timeout = self.timeout if timeout is None else timeout
        headers = {'Accept': 'application/json'}
        data = None
        if body is not None:
            data = json.dumps(body).encode('utf-8')
            headers['Content-Type'] = 'application/json'
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
            content_type = response.getheader('Content-Type', '')
        except socket.timeout:
            raise errors.Timeout(
                '%s %s: no answer within %s s' %
                (method, path, timeout))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise errors.AgentUnavailable(
                'the agent is not listening on %s (%s); is imgconv agent '
                'running?' % (self.socket_path, e.strerror or e))
        except PermissionError as e:
            raise errors.AgentUnavailable(
                'cannot connect to %s (%s): the socket\'s mode or group '
                'does not allow this user'
                % (self.socket_path, e.strerror or e))
        except (http.client.HTTPException, OSError) as e:
            raise errors.AgentUnavailable(
                '%s %s: the connection to %s failed (%s)' %
                (method, path, self.socket_path, e))
        finally:
            conn.close()
        payload = self._decode(raw, content_type, method, path, status)
        if self.response_hook is not None:
            self.response_hook(method, path, status, content_type, payload)
        if status in ok:
            return status, payload
        raise self._error(status, payload, method, path)

    @staticmethod
    def _decode(raw, content_type, method, path, status):
        if content_type.startswith('application/json'):
            try:
                return json.loads(raw.decode('utf-8'))
            except ValueError:
                raise errors.ProtocolError(
                    '%s %s: HTTP %d with a body that is not JSON' %
                    (method, path, status))
        return raw.decode('utf-8', 'replace')

    @staticmethod
    def _error(status, payload, method, path):
        error = payload.get('error') if isinstance(payload, dict) else None
        if not isinstance(error, dict) or 'type' not in error:
            return errors.ProtocolError(
                '%s %s: HTTP %d without an error body: %.200r' %
                (method, path, status, payload), code=status)
        cls = errors.BY_TYPE.get(error['type'])
        if cls is None:
            return errors.ProtocolError(
                '%s %s: HTTP %d, undocumented error type %r: %s'
                % (method, path, status, error['type'], error.get('message')),
                code=status)
        return cls(error.get('message', ''), code=status)

    # -- the agent

    def health(self):
        return self._request('GET', '/v1/health')[1]

    def openapi(self):
        """The API's OpenAPI document, as the agent serves it."""
        return self._request('GET', '/v1/openapi.json')[1]

    def metrics(self):
        """Prometheus text."""
        return self._request('GET', '/metrics')[1]

    # -- the cache

    def images(self):
        return self._request('GET', '/v1/images')[1]['images']

    def image(self, image_id):
        """The cached image; raises ImageNotCached when the cache has no such
        image.
        """
        return self._request('GET', '/v1/images/%s' % _quote(image_id))[1]

    def fetch(self, image_id, wait=True, timeout=None, poll=0.2):
        """Makes sure the image is cached (one download per image, however many
        ask).

        With ``wait`` (the default) returns the cached image once it is ready,
        and raises FetchFailed when the fetch ends in error, Timeout after
        ``timeout`` seconds (None: no limit). Without ``wait`` returns what the
        agent answered: the image when it is already cached, else the fetch
        job.
        """
        started = time.monotonic()
        status, body = self._request(
            'PUT', '/v1/images/%s' %
            _quote(image_id), ok=(
                200, 202))
        if status == 200 or not wait:
            return body
        image_id = body.get('image_id', image_id)
        while True:
            image = self.image(image_id)
            if image['state'] == 'ready':
                return image
            if image['state'] == 'error':
                raise errors.FetchFailed(
                    'image %s: %s' %
                    (image_id, image.get(
                        'error', 'the fetch failed')))
            left = None if timeout is None else timeout - \
                (time.monotonic() - started)
            if left is not None and left <= 0:
                raise errors.Timeout(
                    'image %s is still %s after %s s' %
                    (image_id, image['state'], timeout))
            time.sleep(poll if left is None else min(poll, left))
            poll = min(poll * 2, 2.0)

    def pin(self, image_id):
        return self._request('PUT', '/v1/images/%s/pin' % _quote(image_id))[1]

    def unpin(self, image_id):
        return self._request(
            'DELETE',
            '/v1/images/%s/pin' %
            _quote(image_id))[1]

    def evict(self, image_id):
        """Removes the image from the cache; Busy while it is pinned, in use or
        being fetched.
        """
        self._request('DELETE', '/v1/images/%s' % _quote(image_id), ok=(204,))

    def verify(self, image_id):
        """Hashes the cached file now: ``{"image_id", "ok", "detail"}``; a
        corrupt file is removed.
        """
        return self._request(
            'POST', '/v1/images/%s/verify' %
            _quote(image_id), ok=(
                200, 422))[1]

    # -- jobs

    def jobs(self):
        return self._request('GET', '/v1/jobs')[1]['jobs']

    def job(self, job_id):
        return self._request('GET', '/v1/jobs/%s' % _quote(job_id))[1]

    def events(self, timeout=None):
        """Yields every job change the agent sends (a dict per event) until the
        caller stops iterating.

        ``timeout``: seconds without an event before Timeout is raised (None:
        wait for ever).
        """
        conn = self._connect(self.timeout)
        try:
            try:
                conn.request(
                    'GET',
                    '/v1/events',
                    headers={
                        'Accept': 'text/event-stream'})
                response = conn.getresponse()
            except socket.timeout:
                raise errors.Timeout(
                    'GET /v1/events: no answer within %s s' %
                    self.timeout)
            except OSError as e:
                raise errors.AgentUnavailable(
                    'the agent is not listening on %s (%s)' %
                    (self.socket_path, e))
            if response.status != 200:
                payload = self._decode(
                    response.read(),
                    response.getheader(
                        'Content-Type',
                        ''),
                    'GET',
                    '/v1/events',
                    response.status)
                raise self._error(
                    response.status, payload, 'GET', '/v1/events')
            if self.response_hook is not None:
                self.response_hook(
                    'GET',
                    '/v1/events',
                    200,
                    response.getheader(
                        'Content-Type',
                        ''),
                    '')
            conn.sock.settimeout(timeout)
            kind, data = None, []
            while True:
                try:
                    line = response.readline()
                except socket.timeout:
                    raise errors.Timeout('no event within %s s' % timeout)
                if not line:
                    return
                line = line.decode('utf-8').rstrip('\r\n')
                if line == '':
                    if data and kind in (None, 'job'):
                        yield json.loads('\n'.join(data))
                    kind, data = None, []
                elif line.startswith('event:'):
                    kind = line[6:].strip()
                elif line.startswith('data:'):
                    data.append(line[5:].lstrip())
        finally:
            conn.close()

    # -- disks

    def disk_create(
            self,
            instance_uuid,
            image_id,
            size=None,
            wait=True,
            timeout=None):
        """Makes ``<instance_uuid>_disk`` from the image and returns the disk
        (with ``method``).

        ``size``: the flavor's root disk in bytes (default the image's virtual
        size). ``wait=False`` returns the build's job at once. ``timeout``
        (default 30 minutes) bounds a waited build.
        """
        body = {'instance_uuid': str(instance_uuid), 'image_id': str(image_id)}
        if size is not None:
            body['size'] = int(size)
        if not wait:
            return self._request(
                'POST', '/v1/disks?wait=false', body=body, ok=(202,))[1]
        timeout = DEFAULT_DISK_TIMEOUT if timeout is None else timeout
        return self._request('POST', '/v1/disks', body=body,
                             timeout=timeout, ok=(201,))[1]

    def disks(self):
        """``{"backend": "rbd"|"local", "disks": [...]}``."""
        return self._request('GET', '/v1/disks')[1]

    def disk_get(self, instance):
        """The disk of an instance (its uuid or the disk's name); DiskNotFound
        when there is none.
        """
        return self._request(
            'GET', '/v1/disks/%s' %
            _quote(
                disk_name(instance)))[1]

    def disk_delete(self, instance):
        self._request(
            'DELETE', '/v1/disks/%s' %
            _quote(
                disk_name(instance)), ok=(
                204,))

    def disk_flatten(self, instance, timeout=None):
        timeout = DEFAULT_DISK_TIMEOUT if timeout is None else timeout
        return self._request(
            'POST',
            '/v1/disks/%s/flatten' %
            _quote(
                disk_name(instance)),
            timeout=timeout)[1]

    def collect_bases(self, idle=None, images=()):
        """Removes idle shared bases now; returns the names removed."""
        query = []
        if idle is not None:
            query.append(('idle', str(idle)))
        query.extend(('image', str(i)) for i in images)
        path = '/v1/bases/gc' + \
            ('?' + urllib.parse.urlencode(query) if query else '')
        return self._request('POST', path)[1]['removed']
