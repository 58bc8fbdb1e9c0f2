#!/usr/bin/env bash
# Watch the VXLAN traffic on a lab host's underlay port, from the lab switch's namespace:
#   scripts/lab-capture.sh mgr1 [LAB] [tcpdump args...]
# Shows the outer UDP/4789 packets and, decoded by tcpdump, the workload packets inside.
set -euo pipefail
host=${1:?usage: $0 HOST [LAB] [tcpdump args...]}
lab=${2:-shoal}
shift $(( $# >= 2 ? 2 : 1 ))
exec ip netns exec "${lab}-switch" tcpdump -n -i "$host" "$@" udp port 4789
