//! Sizes for people: read as `512K`, `64M`, `1G` (powers of 1024), shown as `1.5 MiB`; and
//! durations shown as `8 h`, `1 h 30 min`, `45 s`.

use std::time::Duration;

/// A duration as given, for messages about a limit: `2.5 s`, `30 s`.
pub fn human_duration_precise(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// A duration for people, to the second: `45 s`, `2 min`, `1 h 30 min`, `2 d`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 if s.is_multiple_of(60) => format!("{} min", s / 60),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ if s.is_multiple_of(86_400) => format!("{} d", s / 86_400),
        _ if s.is_multiple_of(3600) => format!("{} h", s / 3600),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// A moment for people, in UTC to the minute: `2026-12-02 04:03`, from milliseconds since
/// the epoch.
pub fn utc_minute(ms: i64) -> String {
    let minutes = ms.div_euclid(60_000);
    let (days, minute) = (minutes.div_euclid(1440), minutes.rem_euclid(1440));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        minute / 60,
        minute % 60
    )
}

/// A count and its noun for people: `1 queued message`, `2 queued messages` (`noun` is
/// singular and takes an `s`).
pub fn counted(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// A size for people: `512 B`, `1.5 KiB`, `5.0 MiB`, `1.2 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    for unit in UNITS {
        if value < 1024.0 || unit == "GiB" {
            return format!("{value:.1} {unit}");
        }
        value /= 1024.0;
    }
    unreachable!("the last unit always returns")
}

/// `123`, `64K`, `64M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => return Err(format!("unknown unit {unit:?}: use K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 1048576, 512K, 64M or 1G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_thing_is_singular_and_others_plural() {
        use super::counted;
        assert_eq!(counted(0, "session"), "0 sessions");
        assert_eq!(counted(1, "queued message"), "1 queued message");
        assert_eq!(counted(2, "account"), "2 accounts");
    }

    #[test]
    fn moments_read_as_utc_dates() {
        use super::utc_minute;
        assert_eq!(utc_minute(0), "1970-01-01 00:00");
        assert_eq!(utc_minute(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc_minute(1_796_184_180_000), "2026-12-02 04:03");
        assert_eq!(utc_minute(-60_000), "1969-12-31 23:59");
    }

    #[test]
    fn durations_read_at_a_glance() {
        use super::human_duration as h;
        use std::time::Duration as D;
        assert_eq!(h(D::from_secs(45)), "45 s");
        assert_eq!(h(D::from_secs(120)), "2 min");
        assert_eq!(h(D::from_secs(90)), "1 min 30 s");
        assert_eq!(h(D::from_secs(8 * 3600)), "8 h");
        assert_eq!(h(D::from_secs(5400)), "1 h 30 min");
        assert_eq!(h(D::from_secs(2 * 86_400)), "2 d");
    }

    use super::*;

    #[test]
    fn sizes_read_and_show() {
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1T").is_err() && parse_size("x").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(3 << 30), "3.0 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(5 << 20), "5.0 MiB");
    }
}
