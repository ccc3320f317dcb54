.intel_syntax noprefix
.code64
    # Map 0xc0000000-0xffffffff's first 2 MiB of the virtio window: a PD
    # at 0x300000, entry 0x80 (0xd0000000), uncached; PDPT[3] -> that PD.
    mov rdi, 0x300000 + 0x80*8
    mov rax, 0xd000009b
    mov [rdi], rax
    mov rdi, 0xa000 + 3*8
    mov rax, 0x300003
    mov [rdi], rax
    mov rax, cr3
    mov cr3, rax

.macro bringup base, nq, area
    mov rbx, \base
    mov dword ptr [rbx+0x70], 0
    mov dword ptr [rbx+0x70], 1
    mov dword ptr [rbx+0x70], 3
    mov dword ptr [rbx+0x24], 1
    mov dword ptr [rbx+0x20], 1
    mov dword ptr [rbx+0x70], 0xb
    xor ecx, ecx
1:
    mov dword ptr [rbx+0x30], ecx
    mov dword ptr [rbx+0x38], 16
    mov eax, ecx
    shl eax, 12
    add eax, \area
    mov dword ptr [rbx+0x80], eax
    mov dword ptr [rbx+0x84], 0
    add eax, 0x100
    mov dword ptr [rbx+0x90], eax
    mov dword ptr [rbx+0x94], 0
    add eax, 0x100
    mov dword ptr [rbx+0xa0], eax
    mov dword ptr [rbx+0xa4], 0
    mov dword ptr [rbx+0x44], 1
    inc ecx
    cmp ecx, \nq
    jb 1b
    mov dword ptr [rbx+0x70], 0xf
    mov dword ptr [rbx+0x50], 1
    mov dword ptr [rbx+0x50], 0
.endm

    # vsock: clean rings, bring up (worker thread starts), kick, reset.
    bringup 0xd0000000, 3, 0x400000
    mov dword ptr [rbx+0x70], 0
    # fs: the same (a fresh FUSE server is built on reset).
    bringup 0xd0001000, 2, 0x410000
    mov dword ptr [rbx+0x70], 0
    # net: the same (the tap stays open across the reset).
    bringup 0xd0002000, 2, 0x420000
    mov dword ptr [rbx+0x70], 0
    # net with a corrupt tx available index: broken, parked, reset.
    mov word ptr [0x421102], 0x1000
    bringup 0xd0002000, 2, 0x420000
    mov ecx, 2000000
4:  dec ecx
    jnz 4b
    mov dword ptr [rbx+0x70], 0
    # vsock again with a corrupt tx available index: the worker marks the
    # device broken and parks; then the reset stops it.
    mov word ptr [0x401102], 0x1000
    bringup 0xd0000000, 3, 0x400000
    mov ecx, 2000000
2:  dec ecx
    jnz 2b
    mov dword ptr [rbx+0x70], 0
    # Report and reset the machine.
    mov dx, 0x3f8
    mov al, 'O'
    out dx, al
    mov al, 'K'
    out dx, al
    mov al, 0xfe
    out 0x64, al
3:  hlt
    jmp 3b
