// The fiber context switch of the host CUDA model (cuda_emu.h), x86-64 System V: push the
// callee-saved registers on the current stack, store its pointer in *save_sp (rdi), load load_sp
// (rsi) and pop the other fiber's registers; `ret` continues where that fiber switched away (or at
// its entry function, see init_context). Floating-point control state is not switched: nothing in
// the model changes it.
#if defined(__x86_64__)
asm(R"(
    .text
    .globl scnet_emu_switch
    .type scnet_emu_switch, @function
scnet_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size scnet_emu_switch, .-scnet_emu_switch
)");
#endif
