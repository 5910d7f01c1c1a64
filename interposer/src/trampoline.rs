//! The body shared by the naked loader exports (`dlopen`, `dlmopen`, `dlsym`): they
//! must reach the real function by a tail jump, with the caller's return address
//! still on the stack, so that glibc sees the real caller (`RTLD_NEXT`, the caller's
//! namespace), and only an assembly body can do that.

/// The assembly of a trampoline (x86_64, System V): saves the argument registers
/// `save` (pushed in that order), reserves a zeroed `slot`-byte stack slot and passes
/// its address in `slot_arg`, calls `prepare` (the saved arguments still in their
/// registers), then restores the registers (`restore`: `save` reversed) and runs
/// `after` (e.g. to put `prepare`'s answer into an argument). If `prepare` left an
/// address in the slot it tail-jumps there; otherwise it runs `on_null` and returns
/// (with whatever is then in `rax`). `save` and `slot` keep the stack 16-byte aligned
/// at the call (8 at entry), and every stack move has its CFI note.
macro_rules! trampoline {
    (
        prepare = $prepare:path,
        save = [$($save:literal),+],
        restore = [$($restore:literal),+],
        slot = $slot:literal in $slot_arg:literal,
        after = [$($after:literal),*],
        on_null = [$($on_null:literal),*] $(,)?
    ) => {
        std::arch::naked_asm!(
            ".cfi_startproc",
            "endbr64",
            $(concat!("push ", $save), ".cfi_adjust_cfa_offset 8",)+
            concat!("sub rsp, ", $slot),
            concat!(".cfi_adjust_cfa_offset ", $slot),
            "mov qword ptr [rsp], 0",
            concat!("mov ", $slot_arg, ", rsp"),
            "call {prepare}",
            "mov r11, qword ptr [rsp]",
            concat!("add rsp, ", $slot),
            concat!(".cfi_adjust_cfa_offset -", $slot),
            $(concat!("pop ", $restore), ".cfi_adjust_cfa_offset -8",)+
            $($after,)*
            "test r11, r11",
            "jz 2f",
            "jmp r11",
            "2:",
            $($on_null,)*
            "ret",
            ".cfi_endproc",
            prepare = sym $prepare,
        )
    };
}
