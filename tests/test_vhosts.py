"""Each test session works in a RabbitMQ vhost of its own (issue 8, observation 12).

Tests bind `#` on accounts_in; a second test node on the same vhost would get
their messages (and they its), which once made two AccountTransfers numbered 1.
"""

from __future__ import annotations

import random
import uuid

import pika
import pytest
import vhosts
from broker import catching_queue, declare_smp_exchanges
from drivers import free_port

from pyswpt import sharding, topology


def test_session_works_in_a_vhost_of_its_own_that_exists(rabbitmq_url, rabbitmq_server):
    vhost = vhosts.vhost_of(rabbitmq_url)
    assert vhost != vhosts.DEFAULT_VHOST
    assert vhost != vhosts.vhost_of(rabbitmq_server.url)
    assert vhost.startswith("pyswpt_test_")
    assert rabbitmq_server.vhost_admin.vhost_exists(vhost)


def test_accounts_in_message_of_the_default_vhost_never_reaches_a_session_queue_bound_with_hash(rabbitmq_url):
    declare_smp_exchanges(rabbitmq_url)
    key = sharding.binary_routing_key(random.randint(1, sharding.MAX_INT64), random.randint(1, sharding.MAX_INT64))
    with catching_queue(rabbitmq_url, [(topology.ACCOUNTS_IN, "#")]) as session_queue:
        with topology.open_channel(vhosts.url_with_vhost(rabbitmq_url, vhosts.DEFAULT_VHOST)) as channel:
            # Where other nodes publish: `/`, with a witness queue proving the message was routed there.
            channel.exchange_declare(topology.ACCOUNTS_IN, exchange_type="topic", durable=True)
            witness = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(witness, topology.ACCOUNTS_IN, routing_key=key)
            channel.confirm_delivery()
            body = f"vhost isolation probe {uuid.uuid4().hex}".encode()
            channel.basic_publish(topology.ACCOUNTS_IN, key, body, pika.BasicProperties(type="Probe"), mandatory=True)
            _method, _properties, routed = channel.basic_get(witness, auto_ack=True)
        assert routed == body
        session_queue.assert_empty()


def test_own_vhost_is_usable_inside_and_deleted_afterwards_even_after_an_error(rabbitmq_server):
    admin = rabbitmq_server.vhost_admin
    with pytest.raises(RuntimeError, match="the body failed"):
        with vhosts.own_vhost(admin, rabbitmq_server.url, "pyswpt_test_throwaway") as url:
            vhost = vhosts.vhost_of(url)
            assert admin.vhost_exists(vhost)
            with topology.open_channel(url) as channel:
                channel.queue_declare("", exclusive=True)
            raise RuntimeError("the body failed")
    assert not admin.vhost_exists(vhost)


def test_a_management_api_that_does_not_answer_is_a_clear_error():
    silent = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(vhosts.VhostAdminError, match=vhosts.MANAGEMENT_URL_VARIABLE):
        vhosts.vhost_admin_for("amqp://guest:guest@127.0.0.1:5672/%2F", silent)


def test_url_with_vhost_keeps_the_rest_and_encodes_the_name():
    url = vhosts.url_with_vhost("amqp://u:p@h:5672/%2F?heartbeat=5", "a/b")
    assert url == "amqp://u:p@h:5672/a%2Fb?heartbeat=5"
    assert vhosts.vhost_of(url) == pika.URLParameters(url).virtual_host == "a/b"
    assert vhosts.vhost_of("amqp://h:5672") == vhosts.vhost_of("amqp://h/%2F") == "/"
