"""Origin server behind Pushpin for `bench/compare`.

GET /sse/<channel> holds an SSE stream on <channel> (GRIP); a
WebSocket-over-HTTP request to /ws/<channel> subscribes the socket to
<channel>. Everything else is 404.
"""
import http.server
import socketserver
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def channel(self, prefix):
        path = self.path.split("?")[0]
        return path[len(prefix):] if path.startswith(prefix) else None

    def do_GET(self):
        ch = self.channel("/sse/")
        if not ch:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b": hello\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Grip-Hold", "stream")
        self.send_header("Grip-Channel", ch)
        self.send_header("Grip-Keep-Alive", ":\\n\\n; format=cstring; timeout=20")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        ch = self.channel("/ws/")
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length) if length else b""
        if not ch:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        out = b""
        if data.startswith(b"OPEN"):
            sub = ('c:{"type": "subscribe", "channel": "%s"}' % ch).encode()
            out = b"OPEN\r\nTEXT %x\r\n%s\r\n" % (len(sub), sub)
        self.send_response(200)
        self.send_header("Content-Type", "application/websocket-events")
        self.send_header("Sec-WebSocket-Extensions", "grip")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    request_queue_size = 4096


if __name__ == "__main__":
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
