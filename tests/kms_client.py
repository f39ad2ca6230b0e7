"""An independent KMS v2 client for tests/tests/kms.rs: Python grpcio with stubs that
grpc_tools.protoc generated from sso-client/proto/kms/v2/api.proto at test time.

Usage: kms_client.py SOCKET RUST_CIPHERTEXT_HEX RUST_KEY_ID
Prints one JSON object with what the agent answered; the Rust test judges it.
"""

import json
import os
import sys

import grpc

from kms.v2 import api_pb2, api_pb2_grpc


def main():
    socket, rust_ciphertext, rust_key_id = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
    # grpc-core (1.57 and later) sends the percent-encoded socket path as :authority on a
    # unix: target, which is not a valid HTTP/2 authority; the h2 crate under the agent
    # answers RST_STREAM(PROTOCOL_ERROR). grpc-go, and so kube-apiserver, sends "localhost".
    # Clients built on grpc-core must set the authority, as this one does.
    channel = grpc.insecure_channel("unix://" + socket, options=[("grpc.default_authority", "localhost")])
    stub = api_pb2_grpc.KeyManagementServiceStub(channel)
    out = {}

    status = stub.Status(api_pb2.StatusRequest(), timeout=10)
    out["status"] = {"version": status.version, "healthz": status.healthz, "key_id": status.key_id}

    seed = os.urandom(32)
    enc = stub.Encrypt(api_pb2.EncryptRequest(plaintext=seed, uid="python-encrypt"), timeout=10)
    out["encrypt"] = {
        "plaintext": seed.hex(),
        "ciphertext": enc.ciphertext.hex(),
        "key_id": enc.key_id,
        "annotations": len(enc.annotations),
    }
    dec = stub.Decrypt(
        api_pb2.DecryptRequest(ciphertext=enc.ciphertext, uid="python-decrypt", key_id=enc.key_id),
        timeout=10,
    )
    out["roundtrip"] = dec.plaintext == seed

    dec = stub.Decrypt(
        api_pb2.DecryptRequest(ciphertext=rust_ciphertext, uid="python-decrypt-rust", key_id=rust_key_id),
        timeout=10,
    )
    out["rust_plaintext"] = dec.plaintext.hex()

    tampered = bytearray(enc.ciphertext)
    tampered[-1] ^= 0x01
    try:
        dec = stub.Decrypt(
            api_pb2.DecryptRequest(ciphertext=bytes(tampered), uid="python-tampered", key_id=enc.key_id),
            timeout=10,
        )
        out["tampered"] = "ANSWERED " + dec.plaintext.hex()
    except grpc.RpcError as e:
        out["tampered"] = e.code().name

    print(json.dumps(out))


if __name__ == "__main__":
    main()
