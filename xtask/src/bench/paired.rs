//! The per-packet cost of the embedded object beside another build of it (`xdp::BASELINE_ENV`),
//! size by size, from the same run: the way to show what one change of the program saves.
use super::{
    report::num,
    xdp::{Results, SizeResult},
};
use std::fmt::Write as _;

/// A Markdown table per size measured with both objects; nothing without a baseline.
pub fn section(o: &mut String, x: &Results) {
    let Some(b) = &x.baseline else {
        return;
    };
    let _ = writeln!(
        o,
        "### This build beside the baseline object\n\nThe same cases with the object read from \
         `{}` (measured right after this build's, size by size, in fresh pins): median of the \
         round medians, ns per packet. The floor is each object's own `lb_floor`.\n",
        b.object
    );
    for (new, base) in x.sizes.iter().zip(&b.sizes) {
        table(o, new, base);
    }
    for (p, q) in x.programs.iter().zip(&b.programs) {
        let _ = writeln!(
            o,
            "`{}`: JITed {} bytes, {} instructions verified (baseline: {} bytes, {}).",
            p.name,
            num(p.jited_bytes as f64, 0),
            p.verified_instructions
                .map_or("–".into(), |v| num(v as f64, 0)),
            num(q.jited_bytes as f64, 0),
            q.verified_instructions
                .map_or("–".into(), |v| num(v as f64, 0)),
        );
    }
    let _ = writeln!(o);
}

fn table(o: &mut String, new: &SizeResult, base: &SizeResult) {
    let _ = writeln!(
        o,
        "{} services × {} backends:\n\n| case | this build | baseline | difference | ratio |\n|---|---|---|---|---|",
        num(new.size.services as f64, 0),
        num(new.size.backends as f64, 0)
    );
    for (c, d) in new.cases.iter().zip(&base.cases) {
        let _ = writeln!(
            o,
            "| {:?} | {} | {} | {} | {} |",
            c.case,
            num(c.ns.p50, 0),
            num(d.ns.p50, 0),
            num(c.ns.p50 - d.ns.p50, 0),
            num(c.ns.p50 / d.ns.p50, 2)
        );
    }
    let _ = writeln!(o);
}
