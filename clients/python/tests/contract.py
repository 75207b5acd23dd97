"""Checks real answers of a running agent against its OpenAPI document (JSON
Schema 2020-12, jsonschema).

A ``Recorder`` is the client's response hook: every answer is matched to its
operation (method and path template) and status in the document, and a JSON
body is validated against that response's schema. What was exercised is kept,
so a test can require that every documented operation was called.
"""

import re
import urllib.parse

import jsonschema

METHODS = ('get', 'put', 'post', 'delete', 'patch')


class ContractError(AssertionError):
    pass


class Recorder(object):
    def __init__(self, document):
        self.document = document
        self.seen = set()          # (method, template, status)
        self.problems = []
        self._routes = []
        for template, item in document['paths'].items():
            pattern = '^' + \
                re.sub(r'\\\{[^/]+?\\\}', '[^/]+', re.escape(template)) + '$'
            for method in METHODS:
                if method in item:
                    self._routes.append((method.upper(), re.compile(pattern),
                                         template, item[method]))

    def operations(self):
        """Every (METHOD, template) the document lists."""
        return {(m, t) for m, _, t, _ in self._routes}

    def _resolve(self, node):
        """A response object, through its $ref (#/components/responses/...) if
        it has one.
        """
        if '$ref' in node:
            target = self.document
            for part in node['$ref'][2:].split('/'):
                target = target[part]
            return target
        return node

    def __call__(self, method, path, status, content_type, body):
        path = urllib.parse.urlsplit(path).path
        matches = [(t, op) for m, rx, t, op in self._routes if m ==
                   method and rx.match(path)]
        if not matches:
            self.problems.append(
                '%s %s: no such operation in the document' %
                (method, path))
            return
        # A literal path wins over a template (/v1/openapi.json is not
        # /v1/images/{id}).
        template, operation = sorted(matches, key=lambda x: x[0].count('{'))[0]
        self.seen.add((method, template, status))
        responses = operation.get('responses', {})
        response = responses.get(str(status))
        if response is None:
            self.problems.append(
                '%s %s: HTTP %d is not a documented answer (%s)' %
                (method, template, status, ', '.join(
                    sorted(responses))))
            return
        response = self._resolve(response)
        content = response.get('content')
        if not content:
            if body not in ('', None):
                self.problems.append(
                    '%s %s: HTTP %d should have no body, got %.200r' %
                    (method, template, status, body))
            return
        media = content_type.split(';')[0].strip()
        if media not in content:
            self.problems.append(
                '%s %s: HTTP %d answered %s, the document says %s' %
                (method, template, status, media, ', '.join(content)))
            return
        schema = content[media].get('schema')
        if media != 'application/json' or schema is None:
            return
        wrapped = dict(schema)
        wrapped['components'] = self.document['components']
        try:
            jsonschema.Draft202012Validator(wrapped).validate(body)
        except jsonschema.ValidationError as e:
            where = '/'.join(map(str, e.absolute_path))
            self.problems.append(
                '%s %s: HTTP %d body does not match its schema: %s at %s'
                % (method, template, status, e.message, where))

    def check(self):
        if self.problems:
            raise ContractError('\n'.join(self.problems))
