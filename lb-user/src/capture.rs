//! `lb capture`: sampled frames of one service, as they arrived and as they left (after the
//! NAT rewrite), written to a pcap file. tcpdump never sees the frames the program sends with
//! XDP_TX or XDP_REDIRECT, so the program copies them out itself: the command writes the
//! pinned `CAPTURE` array (which service, 1 in how many packets, how many bytes) and reads the
//! copies from the `CAPTURE_EVENTS` perf buffers; on exit (count or duration reached,
//! SIGINT, SIGTERM, SIGHUP, or an error) it turns capture off again.
use std::{
    borrow::Cow,
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    task::Poll,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::{
    perf::{PerfEvent, PerfEventArrayBuffer},
    Array, MapData, PerfEventArray,
};
use lb_common::{
    abi, names, CaptureConfig, CaptureHeader, CAPTURE_DIR_IN, CAPTURE_DIR_OUT, CAPTURE_MAX_SNAPLEN,
};
use pcap_file::{
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
        PcapNgWriter,
    },
    DataLink, Endianness, TsResolution,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};

use crate::{dataplane::pin_dir, status};

/// Perf buffer pages per CPU (256 KiB with 4 KiB pages: about 170 full-size frames).
const PAGES_PER_CPU: usize = 64;
/// How long frames emitted before capture was turned off are still collected.
const DRAIN: Duration = Duration::from_millis(200);

/// Which copies of a sampled packet to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// As it arrived, before the rewrite.
    In,
    /// As it left, after the rewrite (what the backend or the client receives).
    Out,
    /// Both, the arriving copy first.
    Both,
}

impl Direction {
    fn wants(self, dir: u8) -> bool {
        match self {
            Direction::In => dir == CAPTURE_DIR_IN,
            Direction::Out => dir == CAPTURE_DIR_OUT,
            Direction::Both => true,
        }
    }
}

/// What `lb capture` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub instance: String,
    pub service: String,
    pub file: PathBuf,
    /// Stop after writing this many frames.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Capture one packet in `sample`.
    pub sample: u32,
    pub snaplen: u32,
    pub direction: Direction,
    /// Take over from another capture (or from one that was killed before it cleaned up).
    pub force: bool,
}

/// What a capture wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub frames: u64,
    /// Samples the kernel dropped because a perf buffer was full.
    pub lost: u64,
}

/// Parses `--sample`: `1/N` or `N` (capture one packet in N), N >= 1.
pub fn parse_sample(s: &str) -> Result<u32, String> {
    let n = s.strip_prefix("1/").unwrap_or(s);
    match n.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{s:?}: expected 1/N or N with N >= 1 (capture one packet in N)"
        )),
    }
}

/// Parses `--snaplen`: 1 to `CAPTURE_MAX_SNAPLEN` bytes.
pub fn parse_snaplen(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (1..=CAPTURE_MAX_SNAPLEN).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: expected 1 to {CAPTURE_MAX_SNAPLEN} bytes")),
    }
}

/// Splits one `CAPTURE_EVENTS` sample into its header and the captured bytes (the kernel pads
/// samples to 8 bytes; the header's `caplen` says where the frame ends).
pub fn decode(sample: &[u8]) -> Result<(CaptureHeader, &[u8])> {
    let n = std::mem::size_of::<CaptureHeader>();
    ensure!(
        sample.len() >= n,
        "capture event of {} bytes is shorter than its header",
        sample.len()
    );
    let hdr: CaptureHeader = bytemuck::pod_read_unaligned(&sample[..n]);
    let frame = sample.get(n..n + hdr.caplen as usize).with_context(|| {
        format!(
            "capture event of {} bytes announces {} captured bytes",
            sample.len(),
            hdr.caplen
        )
    })?;
    Ok((hdr, frame))
}

/// The output file: classic pcap (nanosecond timestamps), or pcapng when the name ends in
/// `.pcapng`, where each frame is also marked inbound (as it arrived) or outbound (as it left).
enum Writer {
    Pcap(PcapWriter<BufWriter<File>>),
    PcapNg(PcapNgWriter<BufWriter<File>>),
}

impl Writer {
    fn create(path: &Path, snaplen: u32, name: &str) -> Result<Writer> {
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        let out = BufWriter::new(file);
        let ng = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("pcapng"));
        if ng {
            let mut w = PcapNgWriter::new(out).context("write the pcapng section header")?;
            w.write_pcapng_block(InterfaceDescriptionBlock {
                linktype: DataLink::ETHERNET,
                snaplen,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Owned(name.to_string())),
                    // Timestamps in nanoseconds (the writer stores them so).
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            })
            .context("write the pcapng interface block")?;
            return Ok(Writer::PcapNg(w));
        }
        let header = PcapHeader {
            version_major: 2,
            version_minor: 4,
            ts_correction: 0,
            ts_accuracy: 0,
            snaplen,
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            endianness: Endianness::native(),
        };
        Ok(Writer::Pcap(
            PcapWriter::with_header(out, header).context("write the pcap header")?,
        ))
    }

    fn write(&mut self, hdr: &CaptureHeader, frame: &[u8], ts: Duration) -> Result<()> {
        match self {
            Writer::Pcap(w) => {
                w.write_packet(&PcapPacket::new(ts, hdr.len, frame))?;
            }
            Writer::PcapNg(w) => {
                // epb_flags bits 0-1: 01 inbound, 10 outbound.
                let flags = if hdr.dir == CAPTURE_DIR_IN { 1 } else { 2 };
                w.write_pcapng_block(EnhancedPacketBlock {
                    interface_id: 0,
                    timestamp: ts,
                    original_len: hdr.len,
                    data: Cow::Borrowed(frame),
                    options: vec![EnhancedPacketOption::Flags(flags)],
                })?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        let mut out = match self {
            Writer::Pcap(w) => w.into_writer(),
            Writer::PcapNg(w) => w.into_inner(),
        };
        out.flush().context("flush the capture file")?;
        Ok(())
    }
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns: turns the program's `bpf_ktime_get_ns()` into
/// wall-clock time.
fn wall_offset_ns() -> Result<i128> {
    use nix::time::{clock_gettime, ClockId};
    let ns = |c| -> Result<i128> {
        let t = clock_gettime(c).context("clock_gettime")?;
        Ok(t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
    };
    Ok(ns(ClockId::CLOCK_REALTIME)? - ns(ClockId::CLOCK_MONOTONIC)?)
}

/// Refuses to drive capture maps whose layout differs from this build's (an agent of another
/// build loaded the data path).
fn check_abi(dir: &Path) -> Result<()> {
    let meta: Array<MapData, u64> =
        Array::try_from(crate::dataplane::open_pinned(dir, names::META)?)
            .context("pinned META has an unexpected layout")?;
    for name in [names::CAPTURE, names::CAPTURE_EVENTS] {
        let slot = names::ALL
            .iter()
            .position(|n| *n == name)
            .with_context(|| format!("{name} is not a pinned map"))?;
        let want = abi::layout(name).with_context(|| format!("no ABI layout for {name}"))?;
        if meta.get(&(slot as u32), 0).unwrap_or(0) != want {
            bail!("the running data path's {name} differs from this build's: run `lb capture` from the build that `lb run` runs");
        }
    }
    Ok(())
}

/// The settings this command wrote; turns capture off when dropped (also on error or panic),
/// unless another capture (`--force`) took over since.
struct Armed {
    map: Array<MapData, CaptureConfig>,
    mine: CaptureConfig,
}

impl Armed {
    fn disarm(&mut self) -> Result<()> {
        if self.mine.service == 0 {
            return Ok(());
        }
        let now = self.map.get(&0, 0).context("read CAPTURE")?;
        if now == self.mine {
            self.map
                .set(0, CaptureConfig::default(), 0)
                .context("turn capture off (CAPTURE[0] = 0)")?;
        }
        self.mine = CaptureConfig::default();
        Ok(())
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Err(e) = self.disarm() {
            eprintln!("lb capture: {e:#}");
        }
    }
}

/// One event, copied out of a perf buffer.
enum Event {
    Sample(Vec<u8>),
    Lost(u64),
}

type Buffers = Vec<AsyncFd<PerfEventArrayBuffer<MapData>>>;

/// Waits until at least one CPU's buffer is readable and moves its events into `out`.
async fn read_events(bufs: &mut Buffers, out: &mut Vec<Event>) -> Result<()> {
    std::future::poll_fn(|cx| {
        let mut any = false;
        for fd in bufs.iter_mut() {
            match fd.poll_read_ready_mut(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    guard.get_inner_mut().for_each(|e| match e {
                        PerfEvent::Sample { head, tail } => {
                            let mut v = head.to_vec();
                            v.extend_from_slice(tail);
                            out.push(Event::Sample(v));
                        }
                        PerfEvent::Lost { count } => out.push(Event::Lost(count)),
                    });
                    guard.clear_ready();
                    any = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e).context("poll a perf buffer")),
                Poll::Pending => {}
            }
        }
        if any {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Writes the copies the options want (of the direction asked for), up to `count` frames.
struct Sink {
    writer: Writer,
    opts: Options,
    offset_ns: i128,
    summary: Summary,
}

impl Sink {
    fn done(&self) -> bool {
        self.opts.count.is_some_and(|c| self.summary.frames >= c)
    }

    fn take(&mut self, events: &mut Vec<Event>) -> Result<()> {
        for ev in events.drain(..) {
            if self.done() {
                continue;
            }
            match ev {
                Event::Lost(n) => self.summary.lost += n,
                Event::Sample(bytes) => {
                    let (hdr, frame) = decode(&bytes)?;
                    if !self.opts.direction.wants(hdr.dir) {
                        continue;
                    }
                    let ns = (hdr.ts_ns as i128 + self.offset_ns).max(0) as u128;
                    let ts =
                        Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32);
                    self.writer.write(&hdr, frame, ts)?;
                    self.summary.frames += 1;
                }
            }
        }
        Ok(())
    }
}

/// Runs a capture until `count` frames are written, `duration` passed, or a signal arrives;
/// capture is off again when this returns.
pub async fn run(opts: Options) -> Result<Summary> {
    let dir = pin_dir(&opts.instance);
    if !dir.join(names::CAPTURE).exists() {
        if dir.join(names::CONFIG).exists() {
            bail!(
                "instance {:?} has no capture maps: its data path was loaded by an older build \
                 (`lb detach --instance {}` and a new `lb run` add them)",
                opts.instance,
                opts.instance
            );
        }
        bail!(
            "no instance {:?}: {} holds no pinned maps (is `lb run` running?)",
            opts.instance,
            dir.display()
        );
    }
    let info_path = status::info_path(&opts.instance);
    let info: status::InstanceInfo =
        serde_json::from_slice(&std::fs::read(&info_path).with_context(|| {
            format!(
                "read {} (the names of instance {:?}'s services; is `lb run` running?)",
                info_path.display(),
                opts.instance
            )
        })?)
        .with_context(|| format!("parse {}", info_path.display()))?;
    let Some(id) = info.services.iter().position(|s| *s == opts.service) else {
        bail!(
            "unknown service {:?}; instance {:?} serves: {}",
            opts.service,
            opts.instance,
            info.services.join(", ")
        );
    };
    check_abi(&dir)?;

    let writer = Writer::create(
        &opts.file,
        opts.snaplen,
        &format!("lb:{}/{}", opts.instance, opts.service),
    )?;
    let mut map: Array<MapData, CaptureConfig> =
        Array::try_from(crate::dataplane::open_pinned(&dir, names::CAPTURE)?)
            .context("pinned CAPTURE has an unexpected layout")?;
    let current = map.get(&0, 0).context("read CAPTURE")?;
    if current.service != 0 && !opts.force {
        let other = info
            .services
            .get(current.service as usize - 1)
            .map_or("?", String::as_str);
        bail!(
            "another capture (of service {other:?}) is running on instance {:?}; if none is, \
             one was killed before it cleaned up: --force takes over",
            opts.instance
        );
    }

    let mut events =
        PerfEventArray::try_from(crate::dataplane::open_pinned(&dir, names::CAPTURE_EVENTS)?)
            .context("pinned CAPTURE_EVENTS is not a perf event array")?;
    let cpus = aya::util::online_cpus()
        .map_err(|(_, e)| e)
        .context("read the online CPUs")?;
    let mut bufs: Buffers = Vec::with_capacity(cpus.len());
    for cpu in cpus {
        let buf = events
            .open(cpu, Some(PAGES_PER_CPU))
            .with_context(|| format!("open the perf buffer of CPU {cpu}"))?;
        // SAFETY: the buffer owns its perf event fd, which stays open (and the same) for as
        // long as the AsyncFd (which owns the buffer) exists.
        let fd = unsafe { AsyncFd::register_with_interest(buf, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                anyhow::anyhow!("register the perf buffer of CPU {cpu} with tokio: {e}")
            })?;
        bufs.push(fd);
    }
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;

    let mine = CaptureConfig {
        service: id as u32 + 1,
        sample: opts.sample,
        snaplen: opts.snaplen,
        _pad: 0,
    };
    map.set(0, mine, 0)
        .context("turn capture on (CAPTURE[0])")?;
    let mut armed = Armed { map, mine };
    eprintln!(
        "capturing service {:?} of instance {:?} (1 in {} packets, {} bytes, {:?}) to {}; Ctrl-C stops",
        opts.service,
        opts.instance,
        opts.sample,
        opts.snaplen,
        opts.direction,
        opts.file.display()
    );

    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut sink = Sink {
        writer,
        offset_ns: wall_offset_ns()?,
        opts,
        summary: Summary::default(),
    };
    let mut pending = Vec::new();
    while !sink.done() {
        tokio::select! {
            r = read_events(&mut bufs, &mut pending) => r?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            } => break,
        }
        sink.take(&mut pending)?;
    }
    armed.disarm()?;
    // Frames emitted just before capture went off may still be on their way.
    let drain_until = tokio::time::Instant::now() + DRAIN;
    while !sink.done() {
        match tokio::time::timeout_at(drain_until, read_events(&mut bufs, &mut pending)).await {
            Ok(r) => r?,
            Err(_) => break,
        }
        sink.take(&mut pending)?;
    }
    let summary = sink.summary;
    sink.writer.finish()?;
    Ok(summary)
}
