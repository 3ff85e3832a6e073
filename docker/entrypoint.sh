#!/bin/sh
# The image's entrypoint: runs `python -m cl_ema "$@"` (or a command of the image, e.g. torchrun, wandb,
# python, bash) as the user who owns the results, never as root unless asked (docs/docker.md).
#
# Started as root (the default), it picks the uid:gid to run as:
#   1. HOST_UID / HOST_GID when set (-e HOST_UID=$(id -u) -e HOST_GID=$(id -g)); HOST_UID=0 runs as root;
#   2. else the owner of the first of /work/outputs, /work/multirun, /work that root does not own
#      (a host folder mounted there belongs to the host user);
#   3. else uid 1000 (user cl_ema).
# then hands /work/outputs and /work/multirun to that user when they are empty and belong to root
# (Docker creates a missing host folder of a bind mount as root), and drops root with setpriv.
# Started as another user (docker run --user $(id -u):$(id -g)), it cannot change owners: it runs as is.
# Either way HOME is a writable folder, and the command is exec'd: it is the container's main process and
# receives docker stop's SIGTERM itself (cl_ema then marks its results interrupted, to resume).
set -eu

fail() {
	echo "error: $*" >&2
	exit 2
}

# overrides (a=b, +a=b, ~a), options (--multirun, -m, --help) or nothing: cl_ema; a command of the image: that
case "${1:-}" in
"" | -* | *=* | +* | "~"*) set -- python -m cl_ema "$@" ;;
*) command -v "$1" >/dev/null 2>&1 || set -- python -m cl_ema "$@" ;;
esac

# getpass.getuser() (torch.compile's cache folder, W&B) needs a name where the uid has none in /etc/passwd
name_user() {
	USER=$(getent passwd "$1" | cut -d: -f1) || true
	USER=${USER:-cl_ema}
	LOGNAME=$USER
	export USER LOGNAME
}

if [ "$(id -u)" != 0 ]; then
	if [ ! -d "$HOME" ] || [ ! -w "$HOME" ]; then
		HOME=$(mktemp -d /tmp/home.XXXXXX)
		export HOME
	fi
	name_user "$(id -u)"
	exec "$@"
fi

number() {
	case "$2" in
	"" | *[!0-9]*) fail "$1=$2: must be a number (a uid or gid: $1=\$(id -${3}))" ;;
	esac
}

if [ -n "${HOST_UID:-}" ]; then
	number HOST_UID "$HOST_UID" u
	uid=$HOST_UID
	gid=${HOST_GID:-$HOST_UID}
	number HOST_GID "$gid" g
else
	uid=1000
	gid=1000
	guessed=yes
	for folder in /work/outputs /work/multirun /work; do
		if [ -d "$folder" ] && [ "$(stat -c %u "$folder")" != 0 ]; then
			uid=$(stat -c %u "$folder")
			gid=$(stat -c %g "$folder")
			guessed=
			break
		fi
	done
fi

if [ "$uid" = 0 ]; then
	exec "$@"
fi

for folder in /work/outputs /work/multirun; do
	if [ -d "$folder" ] && [ "$(stat -c %u "$folder")" = 0 ] && [ -z "$(ls -A "$folder")" ]; then
		chown "$uid:$gid" "$folder"
		if [ -n "${guessed:-}" ]; then
			echo "warning: $folder belonged to root (Docker makes a missing host folder as root): it now belongs to" \
				"uid $uid:$gid; -e HOST_UID=\$(id -u) -e HOST_GID=\$(id -g) chooses the owner" >&2
		fi
	fi
done
as_user() {
	setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
}
if [ -d /work/outputs ] && ! as_user test -w /work/outputs; then
	fail "/work/outputs is not writable by uid $uid (it belongs to uid $(stat -c %u /work/outputs)); run with" \
		"-e HOST_UID=\$(id -u) -e HOST_GID=\$(id -g) as the owner of the host folder"
fi

if [ ! -d "$HOME" ] || ! as_user test -w "$HOME"; then
	HOME=$(mktemp -d /tmp/home.XXXXXX)
	chown "$uid:$gid" "$HOME"
	export HOME
fi
name_user "$uid"
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
