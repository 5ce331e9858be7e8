"""What a connection may carry: HTTP, or TLS around it. mitmproxy picks a DNS layer for a tunnel to
port 53 or 5353 (by the port alone), and raw TCP, UDP or QUIC relays in other cases; none of these
reaches a stage of the gateway, so their bytes would cross uninspected and unrecorded."""

from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers.http import HTTPMode

UNINSPECTED = (layers.DNSLayer, layers.TCPLayer, layers.UDPLayer, layers.RawQuicLayer,
               layers.ServerQuicLayer, layers.ClientQuicLayer)


class OnlyHttp:
    """Runs after mitmproxy's NextLayer: a relay it chose is replaced by an HTTP layer, where bytes
    that are not HTTP are refused 400 and recorded (gateway.proxy.answers)."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if isinstance(nextlayer.layer, UNINSPECTED):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
