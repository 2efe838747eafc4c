"""The broker fixture is a real mosquitto on a free loopback port, stopped afterwards."""

import socket
import threading

import paho.mqtt.client as mqtt

from mpfleet.broker.local import LocalBroker


def _client():
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)


def test_retained_message_reaches_a_later_subscriber(mosquitto):
    pub = _client()
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    pub.publish("mpf/v1/test/state", b"hello", qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()

    got = threading.Event()
    received = []
    sub = _client()

    def on_message(client, userdata, msg):
        received.append((msg.topic, msg.payload, msg.retain))
        got.set()

    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe("mpf/v1/test/#", qos=1)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    assert got.wait(5)
    sub.loop_stop()
    sub.disconnect()
    assert received == [("mpf/v1/test/state", b"hello", True)]


def test_broker_stops_and_frees_its_port(tmp_path):
    with LocalBroker(workdir=tmp_path) as broker:
        port = broker.port
        proc = broker.process
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert proc.poll() is not None, "mosquitto still running"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
