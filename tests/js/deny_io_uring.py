#!/usr/bin/env python3
"""Runs a command the way a default Docker container (seccomp profile of Docker 25+)
runs it: io_uring_setup, io_uring_enter and io_uring_register fail with EPERM.

    deny_io_uring.py PROGRAM [ARGS...]

A seccomp filter, installed with no_new_privs (no privilege needed), then exec."""
import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
# The same numbers on x86_64 and aarch64 (system calls added after the tables merged).
IO_URING_CALLS = (425, 426, 427)


def instruction(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


program = [instruction(BPF_LD_W_ABS, 0, 0, 0)]  # the system call's number
for i, number in enumerate(IO_URING_CALLS):
    # Equal: jump to the EPERM return at the end; otherwise test the next one.
    to_deny = len(IO_URING_CALLS) - i
    program.append(instruction(BPF_JEQ_K, to_deny, 0, number))
program.append(instruction(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
program.append(instruction(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM))
code = ctypes.create_string_buffer(b"".join(program))


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


fprog = SockFprog(len(program), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno()))
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit("prctl(PR_SET_SECCOMP): " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
