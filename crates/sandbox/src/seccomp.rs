//! The builder's seccomp filter, as a classic BPF program.
//!
//! What it denies (the modern Nix deny list on top of a default-allow policy):
//!
//! ```text
//! chmod, fchmod, fchmodat, fchmodat2   with S_ISUID or S_ISGID in the mode  -> EPERM
//! {,l,f}{set,get,list,remove}xattr                                        -> ENOTSUP
//! any other architecture than the native one and its 32-bit sibling       -> kill
//! ```
//!
//! A setuid/setgid file in a store path would be a privilege escalation for whoever runs it
//! later; extended attributes (ACLs, file capabilities) are not part of a NAR, so a build that
//! sets them would differ from its substitute, and `security.capability` is another way to
//! grant privileges.
//!
//! The program is written by hand rather than with `seccompiler`: it is some forty instructions,
//! it must be built before the clone anyway, and spelling out the compat architectures (i386
//! syscall numbers under `int 0x80`, the x32 bit) shows exactly what is covered without adding
//! a dependency.

use crate::SandboxError;

// Instruction classes and fields (linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_AND: u16 = 0x50;
const BPF_JEQ: u16 = 0x10;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;

// struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const fn off_arg_low(i: u32) -> u32 {
    // Little-endian: the low 32 bits come first. mode_t is 32 bits wide.
    16 + 8 * i
}

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AUDIT_ARCH_ARM: u32 = 0x4000_0028;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SUID_SGID: u32 = libc::S_ISUID | libc::S_ISGID;

/// Syscall numbers of one architecture.
struct ArchTable {
    audit_arch: u32,
    /// Cleared from the number before matching (x32 calls on x86_64 carry this bit and share
    /// the numbers of the entries used here).
    mask_off: u32,
    /// (number, index of the mode argument)
    chmods: &'static [(u32, u32)],
    xattrs: &'static [u32],
}

const FCHMODAT2: u32 = 452; // the same number on every architecture (unified table)

const X86_64: ArchTable = ArchTable {
    audit_arch: AUDIT_ARCH_X86_64,
    mask_off: X32_SYSCALL_BIT,
    chmods: &[(90, 1), (91, 1), (268, 2), (FCHMODAT2, 2)],
    // setxattr 188 .. fremovexattr 199
    xattrs: &[188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199],
};

const I386: ArchTable = ArchTable {
    audit_arch: AUDIT_ARCH_I386,
    mask_off: 0,
    chmods: &[(15, 1), (94, 1), (306, 2), (FCHMODAT2, 2)],
    // setxattr 226 .. fremovexattr 237
    xattrs: &[226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237],
};

const AARCH64: ArchTable = ArchTable {
    audit_arch: AUDIT_ARCH_AARCH64,
    mask_off: 0,
    // No chmod on the generic table: fchmod 52, fchmodat 53.
    chmods: &[(52, 1), (53, 2), (FCHMODAT2, 2)],
    // setxattr 5 .. fremovexattr 16
    xattrs: &[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
};

const ARM: ArchTable = ArchTable {
    audit_arch: AUDIT_ARCH_ARM,
    mask_off: 0,
    chmods: &[(15, 1), (94, 1), (333, 2), (FCHMODAT2, 2)],
    xattrs: &[226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237],
};

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The checks for one architecture, entered with the arch in A; ends in a return.
///
/// Short for the syscalls it lets through, because the kernel runs the program once per
/// syscall number and architecture when it installs the filter (`seccomp_cache_prepare`:
/// about 1,400 runs on x86_64, under a spin lock, in every builder's last setup step) to
/// find those always allowed. So the xattr calls, a contiguous block of numbers everywhere,
/// are one range test instead of twelve comparisons: about ten instructions per allowed
/// number instead of twenty, which halved the time of that step.
fn arch_block(t: &ArchTable) -> Vec<libc::sock_filter> {
    let mut b = vec![stmt(BPF_LD | BPF_W | BPF_ABS, OFF_NR)];
    if t.mask_off != 0 {
        b.push(stmt(BPF_ALU | BPF_AND | BPF_K, !t.mask_off));
    }
    let enotsup = RET_ERRNO | libc::EOPNOTSUPP as u32;
    match xattr_range(t.xattrs) {
        Some((lo, hi)) => {
            // nr < lo: on to the chmods; lo <= nr <= hi: ENOTSUP; nr > hi: on to the chmods.
            b.push(jump(BPF_JMP | BPF_JGE | BPF_K, lo, 0, 2));
            b.push(jump(BPF_JMP | BPF_JGT | BPF_K, hi, 1, 0));
            b.push(stmt(BPF_RET | BPF_K, enotsup));
        }
        None => {
            for &nr in t.xattrs {
                b.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1));
                b.push(stmt(BPF_RET | BPF_K, enotsup));
            }
        }
    }
    for &(nr, arg) in t.chmods {
        // A is clobbered by the argument load, but every path after it returns.
        b.push(jump(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 4));
        b.push(stmt(BPF_LD | BPF_W | BPF_ABS, off_arg_low(arg)));
        b.push(jump(BPF_JMP | BPF_JSET | BPF_K, SUID_SGID, 0, 1));
        b.push(stmt(BPF_RET | BPF_K, RET_ERRNO | libc::EPERM as u32));
        b.push(stmt(BPF_RET | BPF_K, RET_ALLOW));
    }
    b.push(stmt(BPF_RET | BPF_K, RET_ALLOW));
    b
}

/// `(first, last)` when `nrs` is one block of consecutive numbers in ascending order.
fn xattr_range(nrs: &[u32]) -> Option<(u32, u32)> {
    let (&lo, &hi) = (nrs.first()?, nrs.last()?);
    let consecutive = nrs.iter().zip(lo..).all(|(&nr, want)| nr == want);
    consecutive.then_some((lo, hi))
}

fn program_for(tables: &[&ArchTable]) -> Result<Vec<libc::sock_filter>, SandboxError> {
    let mut prog = vec![stmt(BPF_LD | BPF_W | BPF_ABS, OFF_ARCH)];
    for t in tables {
        let block = arch_block(t);
        let skip = u8::try_from(block.len()).map_err(|_| {
            SandboxError::InvalidSpec("seccomp filter block longer than a BPF jump".into())
        })?;
        prog.push(jump(BPF_JMP | BPF_JEQ | BPF_K, t.audit_arch, 0, skip));
        prog.extend(block);
    }
    prog.push(stmt(BPF_RET | BPF_K, RET_KILL_PROCESS));
    Ok(prog)
}

/// The filter for the architecture nixb was compiled for.
pub(crate) fn program() -> Result<Vec<libc::sock_filter>, SandboxError> {
    if cfg!(target_arch = "x86_64") {
        program_for(&[&X86_64, &I386])
    } else if cfg!(target_arch = "aarch64") {
        program_for(&[&AARCH64, &ARM])
    } else {
        Err(SandboxError::InvalidSpec(
            "no seccomp filter for this architecture".into(),
        ))
    }
}

/// A filter and the `sock_fprog` pointing at it, kept together so the pointer stays valid.
pub(crate) struct Filter {
    _insns: Vec<libc::sock_filter>,
    fprog: Box<libc::sock_fprog>,
}

// SAFETY: the instructions and the `sock_fprog` pointing at them are written once, in
// `Filter::new`, and only read afterwards (by the kernel, from a child's `seccomp` call), so
// sharing one between threads is sound.
unsafe impl Send for Filter {}
// SAFETY: as for `Send` just above.
unsafe impl Sync for Filter {}

impl Filter {
    fn new() -> Result<Filter, SandboxError> {
        let mut insns = program()?;
        let fprog = Box::new(libc::sock_fprog {
            len: insns.len() as u16,
            filter: insns.as_mut_ptr(),
        });
        Ok(Filter {
            _insns: insns,
            fprog,
        })
    }

    pub fn as_ptr(&self) -> *const libc::sock_fprog {
        &*self.fprog
    }
}

/// The filter, built once per process: the same instructions serve every builder (each child
/// still installs it, since a filter belongs to the task that installs it).
pub(crate) fn filter() -> Result<&'static Filter, SandboxError> {
    static FILTER: std::sync::OnceLock<Option<Filter>> = std::sync::OnceLock::new();
    FILTER
        .get_or_init(|| Filter::new().ok())
        .as_ref()
        .ok_or_else(|| SandboxError::InvalidSpec("no seccomp filter for this architecture".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the subset of classic BPF the filter uses, so the program's
    /// decisions can be checked without installing it.
    fn eval(prog: &[libc::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        eval_counted(prog, nr, arch, args).0
    }

    /// The decision and the number of instructions run to reach it.
    fn eval_counted(
        prog: &[libc::sock_filter],
        nr: u32,
        arch: u32,
        args: [u64; 6],
    ) -> (u32, usize) {
        let mut data = Vec::new();
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let word = |off: u32| {
            let o = off as usize;
            u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
        };
        let (mut a, mut pc, mut ran) = (0u32, 0usize, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            ran += 1;
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => a = word(i.k),
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize
                }
                c if c == BPF_JMP | BPF_JGE | BPF_K => {
                    pc += if a >= i.k { i.jt } else { i.jf } as usize
                }
                c if c == BPF_JMP | BPF_JGT | BPF_K => {
                    pc += if a > i.k { i.jt } else { i.jf } as usize
                }
                c if c == BPF_JMP | BPF_JSET | BPF_K => {
                    pc += if a & i.k != 0 { i.jt } else { i.jf } as usize
                }
                c if c == BPF_RET | BPF_K => return (i.k, ran),
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
    const ENOTSUP: u32 = RET_ERRNO | libc::EOPNOTSUPP as u32;

    #[test]
    fn x86_64_decisions() {
        let p = program_for(&[&X86_64, &I386]).unwrap();
        let x = AUDIT_ARCH_X86_64;
        // chmod("f", 04755) denied, chmod("f", 0755) allowed (numbers from syscall_64.tbl).
        assert_eq!(eval(&p, 90, x, [0, 0o4755, 0, 0, 0, 0]), EPERM);
        assert_eq!(eval(&p, 90, x, [0, 0o755, 0, 0, 0, 0]), RET_ALLOW);
        // fchmodat(dfd, "f", 02755): the mode is the third argument.
        assert_eq!(eval(&p, 268, x, [0, 0, 0o2755, 0, 0, 0]), EPERM);
        assert_eq!(
            eval(&p, 268, x, [0o2755, 0o2755, 0o755, 0, 0, 0]),
            RET_ALLOW
        );
        assert_eq!(eval(&p, 91, x, [3, 0o6000, 0, 0, 0, 0]), EPERM);
        assert_eq!(eval(&p, 452, x, [0, 0, 0o4000, 0, 0, 0]), EPERM);
        // setxattr, flistxattr, fremovexattr
        assert_eq!(eval(&p, 188, x, [0; 6]), ENOTSUP);
        assert_eq!(eval(&p, 196, x, [0; 6]), ENOTSUP);
        assert_eq!(eval(&p, 199, x, [0; 6]), ENOTSUP);
        // read, write, openat, execve untouched
        for nr in [0, 1, 257, 59] {
            assert_eq!(eval(&p, nr, x, [0o4777; 6]), RET_ALLOW, "nr {nr}");
        }
        // The x32 ABI reaches the same entries with bit 30 set.
        assert_eq!(
            eval(&p, 90 | X32_SYSCALL_BIT, x, [0, 0o4755, 0, 0, 0, 0]),
            EPERM
        );
        // i386 compat: chmod is 15, setxattr 226; 90 is mmap there, not chmod.
        let i = AUDIT_ARCH_I386;
        assert_eq!(eval(&p, 15, i, [0, 0o4755, 0, 0, 0, 0]), EPERM);
        assert_eq!(eval(&p, 226, i, [0; 6]), ENOTSUP);
        assert_eq!(eval(&p, 90, i, [0, 0o4755, 0, 0, 0, 0]), RET_ALLOW);
        // Anything else is not expected on this kernel.
        assert_eq!(eval(&p, 0, AUDIT_ARCH_AARCH64, [0; 6]), RET_KILL_PROCESS);
    }

    #[test]
    fn aarch64_decisions() {
        let p = program_for(&[&AARCH64, &ARM]).unwrap();
        let a = AUDIT_ARCH_AARCH64;
        assert_eq!(eval(&p, 53, a, [0, 0, 0o4755, 0, 0, 0]), EPERM);
        assert_eq!(eval(&p, 52, a, [0, 0o755, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval(&p, 5, a, [0; 6]), ENOTSUP);
        assert_eq!(eval(&p, 17, a, [0; 6]), RET_ALLOW); // getcwd
    }

    /// Every x86_64 and i386 number up to 460 against the deny list written out from the
    /// kernel's syscall tables (syscall_64.tbl, syscall_32.tbl), with a set-id mode in every
    /// argument; and the allowed ones decided in a dozen instructions at most, since the
    /// kernel runs the program for each of them when the filter is installed.
    #[test]
    fn every_number_decided_as_the_tables_say_and_quickly_when_allowed() {
        let p = program_for(&[&X86_64, &I386]).unwrap();
        let setid = [0o6755u64; 6];
        for (arch, xattrs, chmods) in [
            (AUDIT_ARCH_X86_64, 188..=199, [90, 91, 268, 452]),
            (AUDIT_ARCH_I386, 226..=237, [15, 94, 306, 452]),
        ] {
            for nr in 0..=460u32 {
                let (got, ran) = eval_counted(&p, nr, arch, setid);
                let want = if xattrs.contains(&nr) {
                    ENOTSUP
                } else if chmods.contains(&nr) {
                    EPERM
                } else {
                    RET_ALLOW
                };
                assert_eq!(got, want, "arch {arch:#x} nr {nr}");
                if want == RET_ALLOW {
                    assert!(ran <= 12, "arch {arch:#x} nr {nr}: {ran} instructions");
                }
            }
        }
        let p = program_for(&[&AARCH64, &ARM]).unwrap();
        for nr in 0..=460u32 {
            let want = if (5..=16).contains(&nr) {
                ENOTSUP
            } else if [52, 53, 452].contains(&nr) {
                EPERM
            } else {
                RET_ALLOW
            };
            assert_eq!(
                eval(&p, nr, AUDIT_ARCH_AARCH64, setid),
                want,
                "aarch64 nr {nr}"
            );
        }
    }

    #[test]
    fn a_gap_in_the_xattr_numbers_falls_back_to_one_comparison_each() {
        assert_eq!(xattr_range(&[5, 6, 7]), Some((5, 7)));
        assert_eq!(xattr_range(&[5, 7]), None);
        assert_eq!(xattr_range(&[]), None);
        let odd = ArchTable {
            audit_arch: AUDIT_ARCH_X86_64,
            mask_off: 0,
            chmods: &[],
            xattrs: &[10, 12],
        };
        let p = program_for(&[&odd]).unwrap();
        assert_eq!(eval(&p, 10, AUDIT_ARCH_X86_64, [0; 6]), ENOTSUP);
        assert_eq!(eval(&p, 11, AUDIT_ARCH_X86_64, [0; 6]), RET_ALLOW);
        assert_eq!(eval(&p, 12, AUDIT_ARCH_X86_64, [0; 6]), ENOTSUP);
    }
}
