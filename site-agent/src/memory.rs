//! How the allocator (mimalloc, the binary's global allocator) keeps freed memory.
//!
//! A `resnet103` training step at 256x256 frees and allocates gigabytes of activations and
//! gradients. mimalloc returns freed pages to the kernel ("purges") 1 s after they are freed by
//! default, and a step takes longer than that on a CPU, so every step faulted its activations
//! back in, page by page, zeroed by the kernel: 25 to 33 % of the cycles of `site-agent bench
//! --config resnet103` were `clear_page_erms` (issue 20's profile). So the agent delays purging
//! by [`PURGE_DELAY_MS`] while it works and purges at once when a task is done
//! ([`release_freed_pages`]): a working agent reuses its pages, an idle one gives them back.
//!
//! Outside the `site-agent` binary (the library in tests, another allocator) both calls only
//! touch mimalloc's own empty heap.

/// How long freed pages stay mapped before mimalloc may return them: longer than a training
/// step of the paper's model on a CPU.
pub const PURGE_DELAY_MS: i64 = 60_000;

/// mimalloc's `mi_option_purge_delay` (its 16th option in both v2 and v3), which
/// `libmimalloc-sys` does not name; a test reads it back.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc keep freed pages for [`PURGE_DELAY_MS`], unless the operator set
/// `MIMALLOC_PURGE_DELAY` (mimalloc reads it at start-up; that value then stands).
#[allow(unsafe_code)]
pub fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: `mi_option_set` stores one integer in mimalloc's option table (an atomic store);
    // `MI_OPTION_PURGE_DELAY` is a valid option of the linked mimalloc.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS as std::ffi::c_long)
    };
}

/// Returns every freed page to the kernel now (after a task: the agent may wait hours for the
/// next one).
#[allow(unsafe_code)]
pub fn release_freed_pages() {
    // SAFETY: `mi_collect` takes no pointers; `force` asks it to purge what it has freed.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option index names mimalloc's purge delay: set, it reads back, and mimalloc's own
    /// environment name for it (`MIMALLOC_PURGE_DELAY`) is the one `keep_freed_pages` defers to.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_is_set_and_reads_back() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set in this environment");
            return;
        }
        keep_freed_pages();
        // SAFETY: reads one integer from mimalloc's option table.
        let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(v as i64, PURGE_DELAY_MS);
        release_freed_pages();
    }
}
