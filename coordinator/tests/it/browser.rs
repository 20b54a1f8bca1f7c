//! `report.html` as a study lead sees it: opened in headless Chromium (Debian's `chromium`,
//! which `.ci/run` installs), with no console message (the page has no script, so any message
//! is a load, parse or security error), the sections and plots in the DOM it built, and a
//! screenshot saved to `target/tmp/report-screenshot.png`. Where no Chromium is installed the
//! test says so and records the skip (`.ci/run` prints it).

use std::path::{Path, PathBuf};
use std::process::Command;

use coordinator::report::{self, Format};

/// Chromium: `FEDTUNE_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FEDTUNE_CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `page` with `extra` arguments: (stdout, console lines).
fn headless(bin: &Path, page: &Path, profile: &Path, extra: &[&str]) -> (String, Vec<String>) {
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    let console = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[test]
fn the_html_report_renders_in_chromium_without_console_errors() {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let Some(bin) = chromium() else {
        let what = "browser: no chromium on the PATH; report.html was not opened in a browser \
                    (apt-get install chromium, or set FEDTUNE_CHROMIUM)";
        eprintln!("skipped: {what}");
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(tmp.join("skipped-tests.txt"))
        {
            let _ = writeln!(f, "{what}");
        }
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    // The harness itself: a page with a console error is caught.
    let bad = dir.path().join("bad.html");
    std::fs::write(&bad, "<!DOCTYPE html><p>x</p><script>console.error('boom')</script>").unwrap();
    let (_, console) = headless(&bin, &bad, &dir.path().join("p0"), &["--dump-dom"]);
    assert!(
        console.iter().any(|l| l.contains("boom")),
        "the harness sees console errors: {console:?}"
    );

    let page = dir.path().join("report.html");
    let html = report::render(&report::build(&crate::report::study()), Format::Html);
    std::fs::write(&page, &html).unwrap();
    let (dom, console) = headless(&bin, &page, &dir.path().join("p1"), &["--dump-dom"]);
    assert!(console.is_empty(), "console messages from report.html: {console:#?}");
    for section in ["Reproducibility", "Methods", "brainstem"] {
        assert!(dom.contains(section), "the rendered DOM has no {section}");
    }
    let svgs = html.matches("<svg").count();
    assert!(svgs > 0 && dom.matches("<svg").count() == svgs, "every plot is in the DOM");
    let shot = tmp.join("report-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let (_, console) = headless(&bin, &page, &dir.path().join("p2"), &[&arg]);
    assert!(console.is_empty(), "{console:#?}");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("report screenshot: {}", shot.display());
}
