# Shared by the launchers (sourced, not run): flag parsing, dry runs, the fit check.
#
# Every launcher takes its own flags, then `--`, then the vdit command it runs everywhere:
#     launch/TARGET.sh [--FLAG=VALUE ...] [--dry_run] -- train --config=FILE[:VARIANT] --workdir=DIR [--config.FIELD=VALUE ...]
# With --dry_run every command is printed, one per line (shell-quoted, ready to paste), and
# nothing runs; a line starting with `#` says what the next commands are for. Needs bash 4.4 or
# newer (macOS ships 3.2: `brew install bash`).

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
VDIT_ARGS=()

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# `squote WORD`: WORD in single quotes (when it needs quoting at all).
squote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    echo "$1"
  else
    local q="'\\''"
    echo "'${1//\'/$q}'"
  fi
}

# `quote ARGS...`: the arguments as one shell-quoted line (--flag='value' where value needs it).
quote() {
  local out=() a
  for a in "$@"; do
    if [[ "$a" =~ ^(--?[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      out+=("${BASH_REMATCH[1]}$(squote "${BASH_REMATCH[2]}")")
    else
      out+=("$(squote "$a")")
    fi
  done
  echo "${out[*]}"
}

# `run CMD ARGS...`: print it (dry run) or echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

# `note TEXT`: a comment line in the dry-run listing (and on stderr in a real run).
note() {
  if ((DRY_RUN)); then echo "# $*"; else echo "# $*" >&2; fi
}

# `parse_args USAGE FLAGS... -- "$@"`: sets FLAG_<name> for each --name=value of the launcher's
# allowed FLAGS (a trailing `!` marks a boolean: --name sets it to 1), DRY_RUN, and VDIT_ARGS (after --).
parse_args() {
  local usage="$1"
  shift
  local stale
  for stale in "${!FLAG_@}"; do unset "$stale"; done # none from the caller's environment
  local allowed=()
  while (($#)) && [[ "$1" != "--" ]]; do
    allowed+=("$1")
    shift
  done
  (($#)) && shift
  local arg name value ok spec
  while (($#)); do
    arg="$1"
    shift
    if [[ "$arg" == "--" ]]; then
      VDIT_ARGS=("$@")
      break
    fi
    case "$arg" in
      --help | -h)
        echo "usage: $usage"
        exit 0
        ;;
      --dry_run)
        DRY_RUN=1
        continue
        ;;
    esac
    [[ "$arg" == --* ]] || die "unexpected argument '$arg' (the vdit command goes after --); usage: $usage"
    name="${arg#--}"
    value=1
    if [[ "$name" == *=* ]]; then
      value="${name#*=}"
      name="${name%%=*}"
    fi
    ok=0
    for spec in "${allowed[@]}"; do
      if [[ "${spec%!}" == "$name" ]]; then
        if [[ "$spec" == *! && "$arg" == *=* ]]; then die "--$name takes no value"; fi
        if [[ "$spec" != *! && "$arg" != *=* ]]; then die "--$name needs a value: --$name=VALUE"; fi
        ok=1
      fi
    done
    ((ok)) || die "unknown flag --$name; usage: $usage"
    printf -v "FLAG_$name" '%s' "$value"
  done
  ((${#VDIT_ARGS[@]})) || die "no vdit command after --; usage: $usage"
  case "${VDIT_ARGS[0]}" in
    --*) die "the vdit command after -- starts with its name, e.g. -- train --config=...; got '${VDIT_ARGS[0]}'" ;;
  esac
  vdit_flag config >/dev/null || die "the vdit command needs --config=FILE[:VARIANT]"
}

# `need NAME...`: each launcher flag must be given.
need() {
  local name var
  for name in "$@"; do
    var="FLAG_$name"
    [[ -n "${!var:-}" ]] || die "--$name=... is required"
  done
}

# `vdit_flag NAME`: the value of --NAME=VALUE in the vdit command (exit 1 when absent).
vdit_flag() {
  local a
  for a in "${VDIT_ARGS[@]}"; do
    if [[ "$a" == "--$1="* ]]; then
      echo "${a#--"$1"=}"
      return 0
    fi
  done
  return 1
}

# `fit_check FIT_FLAGS...`: launch/fit.py with the run's config; a run that will not fit stops here.
fit_check() {
  local cfg=() a
  for a in "${VDIT_ARGS[@]}"; do
    if [[ "$a" == --config=* || "$a" == --config.* ]]; then cfg+=("$a"); fi
  done
  note "will it fit? (refuses the launch, naming the numbers, when it does not)"
  if ((DRY_RUN)); then
    quote "$PYTHON" launch/fit.py "$@" -- "${cfg[@]}"
    return 0
  fi
  echo "+ $(quote "$PYTHON" launch/fit.py "$@" -- "${cfg[@]}")" >&2
  local rc=0
  (cd "$REPO_DIR" && "$PYTHON" launch/fit.py "$@" -- "${cfg[@]}") || rc=$?
  if ((rc == 3)); then
    echo "$(basename "$0"): not launching: the run does not fit (above)" >&2
    exit 3
  elif ((rc != 0)); then
    exit "$rc"
  fi
}
