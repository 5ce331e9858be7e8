"""The proxy edge: the mitmproxy engine and what runs it (one process, or a supervisor with workers
sharing the listeners), and the connection-level guards that reach below mitmproxy's addon API
(connection limits, deadlines, head limits, HTTP/2 floods, WebSocket limits, backpressure, error answers).
It builds the pipeline from gateway.filters; nothing below it imports it (docs/architecture.md)."""
