//! Parsing the flags, with mistakes reported as one line naming what the user set: the variable
//! when the value came from the environment (`BATCH_SIZE="abc": ...`), else the flag.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser};

/// Parses the process's arguments (and the variables clap reads for them) into `T`. `--help` and
/// `--version` print as usual and exit 0; a mistake prints one line, `<program>: error: ...`, on
/// stderr and returns exit status 2.
pub fn parse_args<T: Parser>(program: &str) -> Result<T, ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let result = T::command().try_get_matches_from(&argv).and_then(|matches| T::from_arg_matches(&matches));
    result.map_err(|error| match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => error.exit(),
        _ => {
            eprintln!("{program}: error: {}", usage_line::<T>(&error, &argv, |name| std::env::var_os(name)));
            ExitCode::from(2)
        }
    })
}

/// The one line for a clap error: for a bad value that came from an environment variable (the
/// flag not on the command line), `VARIABLE="value": reason` (without the value for variables
/// whose values are hidden, such as `DATABASE_URL`); otherwise clap's own first line, plus a
/// pointer to `--help` when the mistake is not about a value.
pub fn usage_line<T: CommandFactory>(
    error: &clap::Error,
    argv: &[OsString],
    var: impl Fn(&str) -> Option<OsString>,
) -> String {
    let rendered = error.to_string();
    let first = rendered.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first).to_owned();
    let value_error = matches!(error.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue);
    if !value_error {
        return format!("{first} (see --help)");
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return first;
    };
    let long = arg.split_whitespace().next().unwrap_or("").trim_start_matches('-');
    let command = T::command();
    let found = command
        .get_arguments()
        .chain(command.get_subcommands().flat_map(|sub| sub.get_arguments()))
        .find(|a| a.get_long() == Some(long));
    let Some(found) = found else {
        return first;
    };
    let Some(variable) = found.get_env().and_then(|v| v.to_str()) else {
        return first;
    };
    let flag = format!("--{long}");
    let on_command_line = argv
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .any(|a| a == flag || a.strip_prefix(flag.as_str()).is_some_and(|rest| rest.starts_with('=')));
    let Some(value) = var(variable).filter(|v| !v.is_empty()) else {
        return first;
    };
    if on_command_line {
        return first;
    }
    let reason = std::error::Error::source(error)
        .map(ToString::to_string)
        .or_else(|| first.split_once("': ").map(|(_, reason)| reason.to_owned()))
        .unwrap_or_else(|| "not a valid value".to_owned());
    if found.is_hide_env_values_set() {
        format!("{variable}: {reason}")
    } else {
        format!("{variable}={:?}: {reason}", value.to_string_lossy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        /// A number.
        #[arg(long, env = "TEST_BATCH_SIZE", default_value_t = 1)]
        batch_size: usize,
        /// A duration.
        #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
        older_than: std::time::Duration,
    }

    fn line(argv: &[&str], vars: &[(&str, &str)]) -> String {
        let argv: Vec<OsString> =
            std::iter::once("prog").chain(argv.iter().copied()).map(Into::into).collect();
        let var = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(*v));
        // clap reads the real environment; emulate it by passing the value as the flag would.
        let mut parse_argv = argv.clone();
        if let Some((_, v)) = vars.iter().find(|(k, _)| *k == "TEST_BATCH_SIZE") {
            if !argv.iter().any(|a| a.to_str().is_some_and(|a| a.starts_with("--batch-size"))) {
                parse_argv.push(format!("--batch-size={v}").into());
            }
        }
        let error = Flags::try_parse_from(&parse_argv).unwrap_err();
        usage_line::<Flags>(&error, &argv, var)
    }

    #[test]
    fn a_bad_value_names_the_variable_it_came_from() {
        let from_env = line(&[], &[("TEST_BATCH_SIZE", "abc")]);
        assert_eq!(from_env, "TEST_BATCH_SIZE=\"abc\": invalid digit found in string");
        let from_flag = line(&["--batch-size", "abc"], &[("TEST_BATCH_SIZE", "7")]);
        assert!(from_flag.contains("'--batch-size <BATCH_SIZE>'"), "{from_flag}");
        let duration = line(&["--older-than", "5x"], &[]);
        assert!(duration.contains("--older-than") && duration.contains("is not a duration"), "{duration}");
        let unknown = line(&["--bogus"], &[]);
        assert!(
            unknown.starts_with("unexpected argument '--bogus' found") && unknown.ends_with("(see --help)")
        );
        for text in [from_env, duration, unknown] {
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
