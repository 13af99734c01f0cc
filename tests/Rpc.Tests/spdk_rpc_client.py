#!/usr/bin/env python3
"""A minimal client speaking exactly as SPDK's rpc.py (python/spdk/rpc/client.py JSONRPCClient) does.

Usage: spdk_rpc_client.py SOCKET METHOD [PARAMS_JSON] [METHOD [PARAMS_JSON]]...
Each call is sent on one connection, in order; each reply (the whole JSON-RPC response object) is printed
on its own line. rpc.py's framing: requests are {"jsonrpc":"2.0","method":...,"id":N[,"params":...]}
(params only when non-empty) serialized with json.dumps(indent=2); replies are read with recv(4096) until
raw_decode finds one complete JSON value, the rest stays buffered for the next reply.
"""
import json
import socket
import sys


class Client:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.request_id = 0
        self.recv_buf = ""
        self.decoder = json.JSONDecoder()

    def send(self, method, params=None):
        self.request_id += 1
        req = {"jsonrpc": "2.0", "method": method, "id": self.request_id}
        if params:
            req["params"] = params
        self.sock.sendall(json.dumps(req, indent=2).encode("utf-8"))
        return self.request_id

    def recv(self):
        while True:
            buf = self.recv_buf.lstrip()
            if buf:
                try:
                    response, end = self.decoder.raw_decode(buf)
                    self.recv_buf = buf[end:]
                    return response
                except ValueError:
                    pass
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("connection closed")
            self.recv_buf += data.decode("utf-8")

    def call(self, method, params=None):
        req_id = self.send(method, params)
        response = self.recv()
        if response.get("id") != req_id:
            raise ValueError("id mismatch: sent %d, got %r" % (req_id, response.get("id")))
        return response


def main(argv):
    client = Client(argv[1])
    args = argv[2:]
    i = 0
    while i < len(args):
        method = args[i]
        params = None
        if i + 1 < len(args) and args[i + 1].lstrip().startswith("{"):
            params = json.loads(args[i + 1])
            i += 1
        i += 1
        print(json.dumps(client.call(method, params)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
