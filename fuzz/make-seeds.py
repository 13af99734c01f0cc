#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/ (committed; rerun after changing an input format).

vhost-msg seeds are hand-built message sequences in the order QEMU's vhost-user-blk front end sends them at
start-up (hw/virtio/vhost-user.c: features, protocol features, queue count, backend channel, owner, config,
memory table, in-flight buffer, per-queue size/base/addresses/kick/call/enable, then GET_VRING_BASE at stop),
plus variants (REPLY_ACK on every request, ADD/REM_MEM_REG instead of SET_MEM_TABLE, device reset, config write).
"""
import os
import struct

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- vhost-msg ---------------------------------------------------------------------------------------------
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, GET_CONFIG, SET_CONFIG, GET_INFLIGHT_FD, SET_INFLIGHT_FD = 21, 24, 25, 31, 32
RESET_DEVICE, GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG, SET_STATUS, GET_STATUS = 34, 36, 37, 38, 39, 40
FEATURES = (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28)
PROTOCOL = (1 << 0) | (1 << 3) | (1 << 5) | (1 << 9) | (1 << 12) | (1 << 13) | (1 << 15) | (1 << 16)
UVA = 0x7F0000000000
MEM = 1 << 20
QSIZE = 128


def msg(req, payload=b"", need_reply=False):
    return struct.pack("<III", req, 1 | (8 if need_reply else 0), len(payload)) + payload


def u64(v):
    return struct.pack("<Q", v)


def region(gpa=0, size=MEM, uva=UVA, off=0):
    return struct.pack("<QQQQ", gpa, size, uva, off)


def vring(q, ack=False, base=0):
    desc, avail, used = UVA + 0x10000 * (q + 1), UVA + 0x10000 * (q + 1) + 0x800, UVA + 0x10000 * (q + 1) + 0x1000
    return (msg(SET_VRING_NUM, struct.pack("<II", q, QSIZE), ack)
            + msg(SET_VRING_BASE, struct.pack("<II", q, base), ack)
            + msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, desc, used, avail, 0), ack)
            + msg(SET_VRING_KICK, u64(q), ack)
            + msg(SET_VRING_CALL, u64(q), ack)
            + msg(SET_VRING_ENABLE, struct.pack("<II", q, 1), ack))


def start(ack=False, mem=None, inflight=False, queues=1):
    s = (msg(GET_FEATURES) + msg(GET_PROTOCOL_FEATURES) + msg(SET_PROTOCOL_FEATURES, u64(PROTOCOL))
         + msg(GET_QUEUE_NUM) + msg(GET_MAX_MEM_SLOTS) + msg(SET_BACKEND_REQ_FD, b"", ack) + msg(SET_OWNER, b"", ack)
         + msg(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60)) + msg(SET_FEATURES, u64(FEATURES), ack))
    s += mem if mem is not None else msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(), ack)
    if inflight:
        s += msg(GET_INFLIGHT_FD, struct.pack("<QQHHI", 0, 0, queues, QSIZE, 0))
        s += msg(SET_INFLIGHT_FD, struct.pack("<QQHHI", 8192, 0, queues, QSIZE, 0), ack)
    for q in range(queues):
        s += vring(q, ack)
    return s


def stop(queues=1):
    return b"".join(msg(GET_VRING_BASE, struct.pack("<II", q, 0)) for q in range(queues))


write("vhost-msg", "qemu-blk-start-stop", b"\x00" + start() + stop())
write("vhost-msg", "qemu-blk-reply-ack-2q", b"\x00" + start(ack=True, queues=2) + stop(2))
write("vhost-msg", "qemu-blk-inflight", b"\x00" + start(inflight=True) + stop())
write("vhost-msg", "add-rem-mem-reg", b"\x00" + start(mem=msg(ADD_MEM_REG, u64(0) + region(), True)
                                                     + msg(ADD_MEM_REG, u64(0) + region(0x100000, 0x10000, UVA + MEM, 0), True))
      + msg(REM_MEM_REG, u64(0) + region(0x100000, 0x10000, UVA + MEM, 0), True) + stop())
write("vhost-msg", "reset-and-status", b"\x00" + start() + msg(SET_STATUS, u64(0xF), True) + msg(GET_STATUS)
      + msg(RESET_DEVICE, b"", True) + msg(RESET_OWNER) + start())
write("vhost-msg", "config-write", b"\x00" + msg(GET_PROTOCOL_FEATURES) + msg(SET_PROTOCOL_FEATURES, u64(PROTOCOL))
      + msg(SET_CONFIG, struct.pack("<III", 20, 4, 0) + b"\x01\x00\x00\x00", True)
      + msg(GET_CONFIG, struct.pack("<III", 0, 256, 0) + bytes(256)))
write("vhost-msg", "no-fd-kick-call-err", b"\x00" + msg(SET_FEATURES, u64(FEATURES)) + msg(SET_VRING_KICK, u64(0x100))
      + msg(SET_VRING_CALL, u64(0x101)) + msg(SET_VRING_ERR, u64(0)))
write("vhost-msg", "bad-version", b"\x00" + struct.pack("<III", GET_FEATURES, 2, 0))
write("vhost-msg", "extra-fds", b"\x01" + msg(SET_OWNER) + msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region()))

# ---- desc-chain --------------------------------------------------------------------------------------------
GPA = 0x10000
NEXT, WRITE, INDIRECT = 1, 2, 4


def ring(size, descs, heads, opts=0x30, last_avail=0, extra=None, used_event=0):
    avail = 16 * size
    used = (avail + 6 + 2 * size + 3) & ~3
    img = bytearray(max(used + 6 + 8 * size + 2, 0x400))
    for i, (addr, ln, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", img, 16 * i, addr, ln, flags, nxt)
    struct.pack_into("<HH", img, avail, 0, (last_avail + len(heads)) & 0xFFFF)
    for i, h in enumerate(heads):
        struct.pack_into("<H", img, avail + 4 + 2 * ((last_avail + i) % size), h)
    struct.pack_into("<H", img, avail + 4 + 2 * size, used_event)
    for off, data in (extra or {}).items():
        if len(img) < off + len(data):
            img.extend(bytes(off + len(data) - len(img)))
        img[off:off + len(data)] = data
    exp = size.bit_length() - 1
    return bytes([exp, opts]) + struct.pack("<H", last_avail) + bytes(img)


B = GPA + 0x400
write("desc-chain", "blk-read", ring(16, [(B, 16, NEXT, 1), (B + 0x100, 512, WRITE | NEXT, 2), (B + 0x300, 1, WRITE, 0)], [0]))
write("desc-chain", "blk-write", ring(16, [(B, 16, NEXT, 1), (B + 0x100, 512, NEXT, 2), (B + 0x300, 1, WRITE, 0)], [0]))
table = b"".join(struct.pack("<QIHH", *d) for d in [(B, 16, NEXT, 1), (B + 0x100, 4096, WRITE | NEXT, 2), (B + 0x1100, 1, WRITE, 0)])
write("desc-chain", "indirect", ring(16, [(GPA + 0x380, 48, INDIRECT, 0)], [0], extra={0x380: table}))
write("desc-chain", "across-regions", ring(16, [(GPA + 0x8000 - 100, 200, 0, 0), (B, 1, WRITE, 0)], [0], opts=0x11))
write("desc-chain", "three-heads-event-idx", ring(16, [(B, 16, NEXT, 1), (B + 0x40, 8, WRITE, 0), (B + 0x80, 16, 0, 0), (B + 0xC0, 4, WRITE, 0)],
                                                  [0, 2, 0], opts=0x21, last_avail=0xFFFE))
write("desc-chain", "uva-size-256", ring(256, [(GPA + 0x2000, 64, NEXT, 1), (GPA + 0x2100, 64, WRITE, 0)], [0], opts=0x02))
write("desc-chain", "loop", ring(4, [(B, 16, NEXT, 1), (B, 16, NEXT, 0)], [0]))

# ---- scsi-cdb ----------------------------------------------------------------------------------------------
NONE, OUT, IN = 0, 1, 2


def cmd(cdb, direction=NONE, length=0, data=b"", lun=0, iovs=1):
    return bytes([direction | (lun << 2), len(cdb)]) + struct.pack(">H", length) + bytes([iovs]) + bytes(cdb) + data


def rw10(op, lba, blocks):
    return [op, 0] + list(struct.pack(">I", lba)) + [0, blocks >> 8, blocks & 0xFF, 0]


def rw16(op, lba, blocks):
    return [op, 0] + list(struct.pack(">QI", lba, blocks)) + [0, 0]


scsi = {
    "tur-inquiry": cmd([0x00] * 6) + cmd([0x12, 0, 0, 0, 96, 0], IN, 96),
    "inquiry-vpd": b"".join(cmd([0x12, 1, p, 0, 255, 0], IN, 255) for p in (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)),
    "read-capacity": cmd([0x25] + [0] * 9, IN, 8) + cmd([0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0], IN, 32),
    "read10": cmd(rw10(0x28, 0, 8), IN, 4096, iovs=3),
    "write10-read10": cmd(rw10(0x2A, 8, 2), OUT, 1024, bytes(range(256)) * 4, iovs=2) + cmd(rw10(0x28, 8, 2), IN, 1024),
    "rw6-rw12-rw16": (cmd([0x08, 0, 0, 1, 1, 0], IN, 512) + cmd([0x0A, 0, 0, 2, 1, 0], OUT, 512, b"\x5a" * 512)
                      + cmd([0xA8, 0] + list(struct.pack(">II", 3, 1)) + [0, 0], IN, 512) + cmd(rw16(0x88, 4, 1), IN, 512)
                      + cmd(rw16(0x8A, 5, 1), OUT, 512, b"\xa5" * 512)),
    "unmap": cmd([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], OUT, 24, struct.pack(">HHI", 22, 16, 0) + struct.pack(">QII", 16, 8, 0)),
    "write-same": (cmd([0x41, 0] + list(struct.pack(">I", 32)) + [0, 0, 4, 0], OUT, 512, b"\x11" * 512)
                   + cmd([0x93, 0x08] + list(struct.pack(">QI", 40, 8)) + [0, 0], OUT, 512, bytes(512))),
    "report-luns": cmd([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], IN, 256),
    "mode-sense": (cmd([0x1A, 0, 0x3F, 0, 255, 0], IN, 255) + cmd([0x5A, 0, 0x08, 0, 0, 0, 0, 2, 0, 0], IN, 512)
                   + cmd([0x1A, 8, 0x0A, 0, 255, 0], IN, 255)),
    "request-sense-sync-verify": (cmd([0x03, 0, 0, 0, 252, 0], IN, 252) + cmd([0x35] + [0] * 9)
                                  + cmd([0x2F, 0, 0, 0, 0, 0, 0, 0, 1, 0])),
    "lun1-readonly-write": cmd(rw10(0x2A, 0, 1), OUT, 4096, bytes(4096), lun=1) + cmd(rw10(0x28, 0, 1), IN, 4096, lun=1),
    "missing-lun": cmd([0x12, 0, 0, 0, 96, 0], IN, 96, lun=2),
    "lba-out-of-range": cmd(rw16(0x88, 2047, 2), IN, 1024) + cmd(rw10(0x28, 0, 8), IN, 100),
    "report-opcodes-start-stop": cmd([0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0], IN, 512) + cmd([0x1B, 0, 0, 0, 1, 0]),
}
for name, data in scsi.items():
    write("scsi-cdb", name, data)

# ---- rpc-bind ----------------------------------------------------------------------------------------------
rpc = {
    "malloc-create": b'{"jsonrpc":"2.0","method":"bdev_malloc_create","id":1,"params":{"name":"Malloc0","num_blocks":32768,"block_size":512}}',
    "malloc-create-uuid": b'{"jsonrpc":"2.0","method":"bdev_malloc_create","id":"a","params":{"num_blocks":8,"block_size":4096,"uuid":"f6c6d2b4-1b4a-4c2b-9d52-3b0f2d6e9a10","optimal_io_boundary":16}}',
    "vhost-blk": b'{"jsonrpc":"2.0","method":"vhost_create_blk_controller","id":2,"params":{"ctrlr":"vhost.0","dev_name":"Malloc0","cpumask":"0x1","readonly":false,"transport":"vhost_user_blk"}}',
    "vhost-scsi": (b'{"jsonrpc":"2.0","method":"vhost_create_scsi_controller","id":3,"params":{"ctrlr":"vhost.1","delay":true}}\n'
                   b'{"jsonrpc":"2.0","method":"vhost_scsi_controller_add_target","id":4,"params":{"ctrlr":"vhost.1","scsi_target_num":0,"bdev_name":"Malloc0"}}\n'
                   b'{"jsonrpc":"2.0","method":"vhost_scsi_controller_remove_target","id":5,"params":{"ctrlr":"vhost.1","scsi_target_num":0}}'),
    "get-and-delete": (b'{"jsonrpc":"2.0","method":"vhost_get_controllers","id":6}{"jsonrpc":"2.0","method":"bdev_get_bdevs","id":7,"params":{"name":"Malloc0","timeout":100}}'
                       b'{"jsonrpc":"2.0","method":"vhost_delete_controller","id":8,"params":{"ctrlr":"vhost.0"}}'),
    "batch": b'[{"jsonrpc":"2.0","method":"spdk_get_version","id":9},{"jsonrpc":"2.0","method":"bdev_get_iostat","params":{"names":["a","b"],"per_channel":true}},1]',
    "qos-coalescing": (b'{"jsonrpc":"2.0","method":"bdev_set_qos_limit","id":10,"params":{"name":"Malloc0","rw_ios_per_sec":20000,"rw_mbytes_per_sec":100}}'
                       b' {"jsonrpc":"2.0","method":"vhost_controller_set_coalescing","id":11,"params":{"ctrlr":"vhost.0","delay_base_us":50,"iops_threshold":60000}}'),
    "bad-params": (b'{"jsonrpc":"2.0","method":"bdev_malloc_create","id":12,"params":{"num_blocks":-1,"block_size":"512","x":null}}'
                   b'{"jsonrpc":"2.0","method":"bdev_malloc_delete","id":13,"params":[1]}{"method":"nope","id":[1]}'),
    "escapes": b'{"jsonrpc":"2.0","method":"bdev_malloc_delete","id":14,"params":{"name":"a\\"}\\u00e9\\ud83d\\ude00"}}',
}
for name, data in rpc.items():
    write("rpc-bind", name, b"\x40" + data)

# ---- nvmf-tcp ----------------------------------------------------------------------------------------------
# NVMe/TCP host streams (NVMe/TCP transport spec 1.0, NVMe-oF 1.1 Connect): the order the Linux host sends at
# connect (ICReq, Connect, Property Get/Set, Identify), digests on, in-capsule writes, a write through R2T/H2CData,
# discovery, Connect to an unknown NQN, commands before Connect, bad lengths.

FUZZ_NQN = b"nqn.2016-06.io.spdk:fuzz1"
DISC_NQN = b"nqn.2014-08.org.nvmexpress.discovery"
HOST_NQN = b"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001"


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def icreq(hdgst=False, ddgst=False, maxr2t=0):
    body = struct.pack("<HBBI", 0, 0, (1 if hdgst else 0) | (2 if ddgst else 0), maxr2t)
    return struct.pack("<BBBBI", 0x00, 0, 128, 0, 128) + body + bytes(128 - 8 - len(body))


def sgl_icd(length):   # data block, offset subtype: in-capsule data
    return struct.pack("<QI3xB", 0, length, 0x01)


def sgl_tdb(length):   # transport data block: data moved with C2HData / R2T+H2CData
    return struct.pack("<QI3xB", 0, length, 0x5A)


def sqe(opc, cid, nsid=0, sgl=None, cdw10_15=b"", fuse_psdt=0x40, fctype=None):
    s = bytearray(64)
    s[0] = opc
    s[1] = fuse_psdt
    struct.pack_into("<H", s, 2, cid)
    if fctype is not None:
        s[4] = fctype
    else:
        struct.pack_into("<I", s, 4, nsid)
    s[24:40] = sgl if sgl is not None else sgl_icd(0)
    s[40:40 + len(cdw10_15)] = cdw10_15
    return bytes(s)


def capsule(cmd, data=b"", hdgst=False, ddgst=False):
    hlen = 72
    pdo = hlen + (4 if hdgst else 0) if data else 0
    plen = hlen + (4 if hdgst else 0) + len(data) + (4 if ddgst and data else 0)
    hdr = struct.pack("<BBBBI", 0x04, (1 if hdgst else 0) | (2 if ddgst and data else 0), hlen, pdo, plen) + cmd
    out = hdr + (struct.pack("<I", crc32c(hdr)) if hdgst else b"")
    if data:
        out += data + (struct.pack("<I", crc32c(data)) if ddgst else b"")
    return out


def h2c_data(cccid, ttag, offset, data, last=True):
    hlen = 24
    hdr = struct.pack("<BBBBIHHII", 0x06, 0x04 if last else 0, hlen, hlen, hlen + len(data), cccid, ttag, offset, len(data)) + bytes(4)
    return hdr + data


def connect(cid, qid, sqsize, nqn=FUZZ_NQN, host=HOST_NQN, cntlid=0xFFFF, kato=0, hdgst=False, ddgst=False):
    cdw = struct.pack("<HHHBxI", 0, qid, sqsize, 0, kato)
    data = bytearray(1024)
    data[0:16] = bytes(range(16))
    struct.pack_into("<H", data, 16, cntlid)
    data[256:256 + len(nqn)] = nqn
    data[512:512 + len(host)] = host
    return capsule(sqe(0x7F, cid, sgl=sgl_icd(1024), cdw10_15=cdw, fctype=0x01), bytes(data), hdgst, ddgst)


def prop_get(cid, offset, size8=False):
    return capsule(sqe(0x7F, cid, fctype=0x04, cdw10_15=struct.pack("<B3xI", 1 if size8 else 0, offset)))


def prop_set(cid, offset, value):
    return capsule(sqe(0x7F, cid, fctype=0x00, cdw10_15=struct.pack("<B3xIQ", 0, offset, value)))


def identify(cid, cns, nsid=0):
    return capsule(sqe(0x06, cid, nsid=nsid, sgl=sgl_tdb(4096), cdw10_15=struct.pack("<I", cns)))


def get_log(cid, lid, numd):
    return capsule(sqe(0x02, cid, sgl=sgl_tdb(numd * 4), cdw10_15=struct.pack("<I", lid | ((numd - 1) << 16))))


def rw(opc, cid, slba, nlb, data=b"", icd=True, hdgst=False, ddgst=False):
    sgl = sgl_icd(len(data)) if icd and data else sgl_tdb(nlb * 512)
    cmd = sqe(opc, cid, nsid=1, sgl=sgl, cdw10_15=struct.pack("<QH", slba, nlb - 1))
    return capsule(cmd, data if icd else b"", hdgst, ddgst)


admin_start = (icreq() + connect(1, 0, 31, kato=15000) + prop_get(2, 0x0, True) + prop_set(3, 0x14, 0x460001)
               + prop_get(4, 0x1C) + identify(5, 1))
# byte 0 = 0: the whole stream of one connection.
write("nvmf-tcp", "icreq-only", b"\x00" + icreq())
write("nvmf-tcp", "admin-connect-identify", b"\x00" + admin_start + identify(6, 2) + identify(7, 0, nsid=1) + identify(8, 3, nsid=1)
      + get_log(9, 0x02, 128) + get_log(10, 0x04, 1024)
      + capsule(sqe(0x09, 11, cdw10_15=struct.pack("<II", 0x07, 0x00030003)))
      + capsule(sqe(0x0C, 12)) + capsule(sqe(0x18, 13)))
write("nvmf-tcp", "digests", b"\x00" + icreq(True, True) + connect(1, 0, 31, hdgst=True, ddgst=True)
      + capsule(sqe(0x7F, 2, fctype=0x00, cdw10_15=struct.pack("<B3xIQ", 0, 0x14, 0x460001)), hdgst=True)
      + capsule(sqe(0x06, 3, sgl=sgl_tdb(4096), cdw10_15=struct.pack("<I", 1)), hdgst=True))
write("nvmf-tcp", "discovery", b"\x00" + icreq() + connect(1, 0, 31, nqn=DISC_NQN) + prop_get(2, 0x0, True)
      + prop_set(3, 0x14, 0x460001) + identify(4, 1) + get_log(5, 0x70, 256))
write("nvmf-tcp", "unknown-nqn", b"\x00" + icreq() + connect(1, 0, 31, nqn=b"nqn.2016-06.io.spdk:nope"))
write("nvmf-tcp", "before-connect", b"\x00" + icreq() + identify(1, 1) + rw(0x02, 2, 0, 1, icd=False))
write("nvmf-tcp", "io-queue-bad-cntlid", b"\x00" + icreq() + connect(1, 1, 127, cntlid=7))
write("nvmf-tcp", "bad-lengths", b"\x00" + icreq() + struct.pack("<BBBBI", 0x04, 0, 72, 200, 50) + bytes(64)
      + struct.pack("<BBBBI", 0x04, 0, 8, 0, 0xFFFFFFF0))
# byte 0 = 1: what follows an I/O queue Connect the harness made (cid 1 used by it).
write("nvmf-tcp", "io-rw-icd", b"\x01" + rw(0x01, 2, 8, 1, bytes(range(256)) * 2) + rw(0x02, 3, 8, 1, icd=False)
      + capsule(sqe(0x00, 4, nsid=1)) + capsule(sqe(0x08, 5, nsid=1, sgl=sgl_tdb(0), cdw10_15=struct.pack("<QH", 0, 7)))
      + capsule(sqe(0x09, 6, nsid=1, sgl=sgl_icd(16), cdw10_15=struct.pack("<II", 0, 4)), struct.pack("<IIQ", 0, 8, 0))
      + rw(0x05, 7, 8, 1, bytes(range(256)) * 2))
write("nvmf-tcp", "io-write-r2t", b"\x01" + rw(0x01, 2, 16, 16, icd=False)
      + h2c_data(2, 0, 0, bytes(4096), last=False) + h2c_data(2, 0, 4096, bytes(4096)))
write("nvmf-tcp", "io-read-big", b"\x01" + rw(0x02, 2, 0, 256, icd=False) + rw(0x02, 3, 2040, 16, icd=False))
