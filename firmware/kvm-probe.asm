; migrant's KVM probe: a 512-byte BIOS boot sector. QEMU starts it with
; KVM and the baseline CPU model (`enforce`); only a guest that really ran
; prints the marker on COM1, which is how a /dev/kvm that opens but cannot
; run a guest (broken nested set-ups) shows. Then it halts for good.
;
; Built by `firmware/build` (nasm) into kvm-probe.bin, which is committed
; and embedded into migrant (src/qemu/accel.rs): building migrant needs no
; assembler. The marker must match accel.rs's MARKER.

bits 16
org 0x7c00

        mov dx, 0x3f8           ; COM1 data port
%macro putc 1
        mov al, %1
        out dx, al
%endmacro
        putc 'M'
        putc 'I'
        putc 'G'
        putc 'R'
        putc 'A'
        putc 'N'
        putc 'T'
        putc '-'
        putc 'K'
        putc 'V'
        putc 'M'
        putc '-'
        putc 'O'
        putc 'K'
        putc 10
        cli
halt:   hlt
        jmp halt

        times 510 - ($ - $$) db 0
        dw 0xaa55               ; boot signature
