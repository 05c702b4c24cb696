#!/bin/sh -
# A block device in a dozen lines of shell: a sparse file in $tmpdir, read and written with dd.
disk=$tmpdir/disk
case "$1" in
  get_ready) truncate -s 16M "$disk" ;;
  thread_model) echo parallel ;;
  get_size) stat -L -c %s "$disk" ;;
  can_write|can_flush|can_trim|can_zero) exit 0 ;;
  pread) dd if="$disk" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none ;;
  pwrite) dd of="$disk" seek=$4 conv=notrunc oflag=seek_bytes status=none ;;
  flush) sync "$disk" ;;
  trim|zero) fallocate -p -o "$4" -l "$3" "$disk" ;;
  *) exit 2 ;;
esac
