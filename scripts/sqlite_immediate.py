"""Start every SQLite transaction that oslo.db opens with BEGIN IMMEDIATE.

oslo.db begins SQLite transactions with a deferred BEGIN. Two connections that
read and then write (Cinder's api, scheduler and volume processes; Glance's
gunicorn threads) make SQLite fail one of them at once with "database is
locked" instead of waiting for the busy timeout: it cannot upgrade both read
locks. Taking the write lock at BEGIN makes them queue (``?timeout=30`` in the
connection URL). Only SQLite connections in oslo.db's autocommit mode are
touched. Import once, after eventlet's monkey patching where a service does it.
"""
from sqlalchemy import event
from sqlalchemy.engine import Engine


@event.listens_for(Engine, "begin")
def _begin_immediate(conn):
    if conn.dialect.name != "sqlite" or "in_transaction" in conn.info:
        return
    # pysqlite in autocommit mode (isolation_level None) emits no BEGIN of
    # its own; elsewhere ours would nest inside pysqlite's.
    if conn.connection.dbapi_connection.isolation_level is None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        # oslo.db's own begin listener sees this marker and emits nothing.
        conn.info["in_transaction"] = True
