"""What a connection may carry: HTTP, or TLS around it where the gateway opens TLS (a CONNECT tunnel).
mitmproxy picks a DNS layer for a tunnel to port 53 or 5353 (by the port alone), and raw TCP, UDP or
QUIC relays in other cases; none of these reaches a stage of the gateway, so their bytes would cross
uninspected and unrecorded. On a listener's own port it takes a TLS ClientHello for TLS to the proxy
itself, which no listener is configured for."""

from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode

from gateway.proxy.requestline import TLS_RECORD_START

UNINSPECTED = (layers.DNSLayer, layers.TCPLayer, layers.UDPLayer, layers.RawQuicLayer,
               layers.ServerQuicLayer, layers.ClientQuicLayer)
# The HTTP layer mitmproxy puts first on a listener of each mode when the client's bytes are not TLS.
LISTENER_HTTP_MODES = {modes.HttpProxy: HTTPMode.regular, modes.ReverseProxy: HTTPMode.transparent}


class PlainListeners:
    """Runs before mitmproxy's NextLayer. A listener speaks plain HTTP: mitmproxy would answer a TLS
    ClientHello on it with a certificate for whatever name the client sent, minted by the gateway's CA,
    and serve the connection as HTTPS (a "secure web proxy", a reverse listener under any name). Its
    bytes go to the HTTP layer instead, which refuses them 400 at once, recorded (gateway.proxy.requestline):
    no certificate is made and no upstream connection opened (so a reverse listener's upstream TLS
    layer is not needed)."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        # Only the listener's mode layer below: the connection's first bytes, not a tunnel's.
        mode = LISTENER_HTTP_MODES.get(type(context.layers[0])) if len(context.layers) == 1 else None
        if mode is not None and nextlayer.layer is None and starts_like_tls_record(nextlayer.data_client()):
            nextlayer.layer = layers.HttpLayer(context, mode)


class OnlyHttp:
    """Runs after mitmproxy's NextLayer: a relay it chose is replaced by an HTTP layer, where bytes
    that are not HTTP are refused 400 and recorded (gateway.proxy.heads). mitmproxy takes one or two
    bytes for no TLS (it needs three to tell): a TLS client whose first write was that short had its
    handshake refused as no HTTP; the choice of HTTP is put off until more bytes come instead."""

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        data = nextlayer.data_client()
        if type(nextlayer.layer) is layers.HttpLayer and data and TLS_RECORD_START.startswith(data):
            nextlayer.context.layers.remove(nextlayer.layer)
            nextlayer.layer = None  # asked again on the next bytes, as mitmproxy's NeedsMoreData does
        elif isinstance(nextlayer.layer, UNINSPECTED):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
