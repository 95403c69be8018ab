//! The HTML dashboard (`/`, `/stats`, `/haproxy?stats`): one page, no external assets. The
//! page carries the stats document it was rendered with and a small script that draws the
//! tables from it, then fetches `/stats.json` every `refresh` and draws them again, so the
//! page and the JSON always show the same values.
//!
//! For tests and scripts the DOM is stable: each (service, backend) row is
//! `<tr id="row-SERVICE-BACKEND">`, each service's total row `<tr id="total-SERVICE">`, each
//! backend row of the backends table `<tr id="backend-BACKEND">`, each interface's "NIC XDP
//! counters" table `<table id="nic-IFACE">` with a row `<tr id="nic-IFACE-COUNTER">` per counter
//! (or one `<tr id="nic-IFACE-none">` saying why there are none), and each cell has
//! `data-k="FIELD"` (and `data-v="RAW VALUE"` where the text is formatted).
use super::model::StatsDoc;

const STYLE: &str = r#"
body{font:13px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#263238;color:#eee;padding:10px 16px}
header h1{font-size:18px;margin:0 0 4px}
header .kv span{margin-right:18px;white-space:nowrap}
header b{color:#fff}
main{padding:8px 16px}
table{border-collapse:collapse;margin:10px 0 18px;background:#fff;min-width:900px}
table.nic{min-width:360px}
caption{text-align:left;font-weight:bold;padding:4px 0;font-size:14px}
caption small{font-weight:normal;color:#555}
th,td{border:1px solid #ccd;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#e3e7ee}
td.l,th.l{text-align:left}
tr.up td[data-k=state]{background:#c8f0c8}
tr.down td[data-k=state]{background:#f4c2c2}
tr.trans td[data-k=state]{background:#f8e7a0}
tr.total td{font-weight:bold;background:#eef}
td.adm-drain,td.adm-disable{background:#ffd9a0}
button{font-size:11px;margin:0 2px}
#msg{color:#a00;margin-left:12px}
.note{color:#666;font-size:12px}
"#;

const SCRIPT: &str = r#"
(function(){
'use strict';
var REFRESH = 2000;
function el(tag, attrs, kids){
  var e = document.createElement(tag);
  if (attrs) for (var k in attrs) { if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]); }
  (kids || []).forEach(function(c){ e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); });
  return e;
}
function num(n){ return String(n); }
function bytes(n){
  var u = ['B','KiB','MiB','GiB','TiB'], i = 0, v = n;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i === 0 ? v + ' B' : v.toFixed(1) + ' ' + u[i];
}
function rate(r){ return r.toFixed(1); }
function dur(s){
  if (s === null || s === undefined) return '-';
  s = Math.floor(s);
  var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
  return (d ? d + 'd ' : '') + (d || h ? h + 'h ' : '') + (d || h || m ? m + 'm ' : '') + x + 's';
}
// A cell: key, raw value, shown text.
function td(k, v, text, cls){
  return el('td', {'data-k': k, 'data-v': v === undefined ? undefined : String(v), 'class': cls}, [text === undefined ? String(v) : text]);
}
function traffic(c, r, withDrops){
  var cells = [
    td('conn_rate', r.new_flows, rate(r.new_flows)),
    td('new_flows', c.new_flows),
    td('packets_in', c.packets_in),
    td('packets_out', c.packets_out),
    td('bytes_in', c.bytes_in, bytes(c.bytes_in)),
    td('bytes_out', c.bytes_out, bytes(c.bytes_out))
  ];
  if (withDrops) cells.push(td('drops', c.drops === undefined ? 0 : c.drops));
  return cells;
}
var TRAFFIC_HEADS = ['new conn/s', 'new flows', 'pkts in', 'pkts out', 'bytes in', 'bytes out'];
function heads(list){ return el('tr', null, list.map(function(h, i){ return el('th', {'class': i === 0 ? 'l' : undefined}, [h]); })); }
function stateClass(p){
  if (p.state.indexOf('going') >= 0) return 'trans';
  return p.up ? 'up' : 'down';
}
function serviceTable(s){
  var check = s.check ? 'check ' + s.check + (s.rise ? ' (rise ' + s.rise + ', fall ' + s.fall + ')' : '') : 'no check';
  var cap = el('caption', null, [s.name + ' ', el('small', null, [
    s.vip + ' \u2192 :' + s.backend_port + ' \u00b7 ' + check + ' \u00b7 balance ' + s.balance +
    ' \u00b7 generation ', el('span', {'data-k': 'generation'}, [num(s.generation)]),
    ' \u00b7 set [' + s.members.join(', ') + ']'])]);
  var t = el('table', {id: 'svc-' + s.name, 'data-service': s.name}, [cap]);
  t.appendChild(el('tr', null, [el('th', {colspan: '7', 'class': 'l'}, ['check']), el('th', {colspan: '2'}, ['connections']),
    el('th', {colspan: '6'}, ['backend traffic (all services: the data path counts per backend)']), el('th')]));
  t.appendChild(heads(['backend', 'state', 'in set', 'override', 'last check', 'latency', 'since change', 'active', 'maxconn'].concat(TRAFFIC_HEADS).concat(['drops'])));
  s.backends.forEach(function(p){
    var tr = el('tr', {id: 'row-' + s.name + '-' + p.backend, 'data-service': s.name, 'data-backend': p.backend, 'class': stateClass(p)}, [
      el('td', {'data-k': 'backend', 'class': 'l'}, [p.backend]),
      el('td', {'data-k': 'state', 'class': 'l'}, [p.state]),
      td('in_set', p.in_set, p.in_set ? 'yes' : 'no'),
      td('admin', p.admin, p.admin, 'adm-' + p.admin),
      el('td', {'data-k': 'last_check', 'class': 'l'}, [p.last_check === null ? '-' : p.last_check]),
      td('last_latency_ms', p.last_latency_ms === null ? '' : p.last_latency_ms, p.last_latency_ms === null ? '-' : p.last_latency_ms.toFixed(1) + ' ms'),
      td('since_change_s', p.since_change_s === null ? '' : p.since_change_s, dur(p.since_change_s)),
      td('active_flows', p.active_flows === null ? '' : p.active_flows, p.active_flows === null ? '-' : num(p.active_flows)),
      td('maxconn_active', p.maxconn === null ? '' : p.maxconn_active, p.maxconn === null ? '-' : p.maxconn_active + ' / ' + p.maxconn)
    ].concat(traffic(p.counters, p.rates, false)).concat([el('td', {'data-k': 'drops'}, ['-'])]));
    t.appendChild(tr);
  });
  t.appendChild(el('tr', {id: 'total-' + s.name, 'class': 'total'}, [
    el('td', {'class': 'l', colspan: '9'}, ['service total (' + s.name + ')'])
  ].concat(traffic(s.counters, s.rates, true))));
  return t;
}
function backendTable(d){
  var t = el('table', {id: 'backends'}, [el('caption', null, ['backends ', el('small', null, ['traffic over all services; operator controls like HAProxy\'s runtime API'])])]);
  t.appendChild(heads(['backend', 'address', 'override'].concat(TRAFFIC_HEADS).concat(['operator'])));
  d.backends.forEach(function(b){
    var ops = el('td', {'class': 'l'}, ['drain', 'disable', 'enable'].map(function(a){
      var btn = el('button', {type: 'button', 'data-backend': b.name, 'data-action': a}, [a]);
      btn.addEventListener('click', function(){ act(b.name, a); });
      return btn;
    }));
    t.appendChild(el('tr', {id: 'backend-' + b.name, 'data-backend': b.name}, [
      el('td', {'data-k': 'backend', 'class': 'l'}, [b.name]),
      el('td', {'data-k': 'address', 'class': 'l'}, [b.address]),
      td('admin', b.admin, b.admin, 'adm-' + b.admin)
    ].concat(traffic(b.counters, b.rates, false)).concat([ops])));
  });
  return t;
}
function eventsTable(d){
  var t = el('table', {id: 'datapath'}, [el('caption', null, ['data path events ', el('small', null, ['non-zero global counters'])])]);
  t.appendChild(heads(['event', 'total', 'per second']));
  d.datapath.filter(function(e){ return e.value !== 0; }).forEach(function(e){
    t.appendChild(el('tr', {id: 'event-' + e.name}, [el('td', {'class': 'l', 'data-k': 'event'}, [e.name]), td('value', e.value), td('rate', e.rate, rate(e.rate))]));
  });
  return t;
}
function nicTable(n){
  var t = el('table', {id: 'nic-' + n.iface, 'data-iface': n.iface, 'class': 'nic'}, [el('caption', null, ['NIC XDP counters \u00b7 ' + n.iface + ' ',
    el('small', null, ['the driver\'s own counters (ethtool -S), queues summed'])])]);
  t.appendChild(heads(['counter', 'total']));
  var names = Object.keys(n.counters || {});
  if (n.error || names.length === 0) {
    var why = n.error ? 'unavailable: ' + n.error : 'driver reports no XDP counters';
    t.appendChild(el('tr', {id: 'nic-' + n.iface + '-none'}, [el('td', {'class': 'l', colspan: '2', 'data-k': 'note'}, [why])]));
    return t;
  }
  names.forEach(function(k){
    t.appendChild(el('tr', {id: 'nic-' + n.iface + '-' + k}, [el('td', {'class': 'l', 'data-k': 'counter'}, [k]), td('value', n.counters[k])]));
  });
  return t;
}
function header(d){
  var c = d.totals.counters, r = d.totals.rates;
  function kv(label, k, v, text){ return el('span', null, [label + ' ', el('b', {'data-k': k, 'data-v': String(v)}, [text === undefined ? String(v) : text])]); }
  var gens = d.services.map(function(s){ return s.name + '=' + s.generation; }).join(' ');
  return el('div', {id: 'summary'}, [
    el('h1', null, ['lb \u00b7 instance ' + d.instance]),
    el('div', {'class': 'kv'}, [
      kv('mode', 'mode', d.mode), kv('ifaces', 'ifaces', d.ifaces.join(','), d.ifaces.join(', ')),
      kv('uptime', 'uptime_s', d.uptime_s, dur(d.uptime_s)),
      kv('set generations', 'generations', gens),
      kv('rate window', 'rate_window_s', d.rate_window_s === null ? '' : d.rate_window_s, d.rate_window_s === null ? '-' : d.rate_window_s.toFixed(1) + ' s')
    ]),
    el('div', {'class': 'kv'}, [
      kv('new conn/s', 'conn_rate', r.new_flows, rate(r.new_flows)), kv('new flows', 'new_flows', c.new_flows),
      kv('pkts in', 'packets_in', c.packets_in), kv('pkts out', 'packets_out', c.packets_out),
      kv('bytes in', 'bytes_in', c.bytes_in, bytes(c.bytes_in)), kv('bytes out', 'bytes_out', c.bytes_out, bytes(c.bytes_out)),
      kv('drops', 'drops', c.drops)
    ]),
    tablesLine(d, kv),
    pairLine(d, kv),
    d.counters_error ? el('div', {id: 'counters-error'}, ['counters unavailable: ' + d.counters_error]) : el('span')
  ]);
}
function tablesLine(d, kv){
  var t = d.tables;
  function fill(k, f){
    var pct = f.capacity ? 100 * f.entries / f.capacity : 0;
    return kv(k, k + '_entries', f.entries, f.entries + ' / ' + f.capacity + ' (' + pct.toFixed(1) + ' %)');
  }
  var kids = t ? [fill('established', t.established), fill('embryonic', t.embryonic), kv('slots', 'slots', t.slots)]
               : [el('span', null, ['connection tables: no GC pass yet'])];
  if (d.maxconn !== null) kids.push(kv('maxconn', 'maxconn_active', d.maxconn_active, d.maxconn_active + ' / ' + d.maxconn));
  return el('div', {'class': 'kv', id: 'tables-fill'}, kids);
}
function pairLine(d, kv){
  var p = d.pair;
  if (!p) return el('span');
  var link = p.receiving ? (p.synced ? 'synced' : 'receiving snapshot') : (p.sending ? 'peer streams nothing here' : 'peer unreachable');
  return el('div', {'class': 'kv', id: 'pair'}, [
    kv('pair', 'pair_role', p.role, p.role + (p.vrrp_state ? ' (keepalived ' + p.vrrp_state + ')' : '')), kv('peer', 'pair_peer', p.peer), kv('sync', 'pair_sync', link),
    kv('eligible', 'pair_eligible', p.eligible, p.eligible ? 'yes' : 'NO: ' + p.why),
    kv('flows sent', 'pair_flows_sent', p.flows_sent), kv('received', 'pair_flows_received', p.flows_received),
    kv('last snapshot', 'pair_last_snapshot_flows', p.last_snapshot_flows, p.last_snapshot_flows + ' flows'),
    kv('sync lag p50/p99', 'pair_lag_p99_us', p.lag_p99_us === null ? '' : p.lag_p99_us,
       p.lag_p99_us === null ? '-' : p.lag_p50_us + ' / ' + p.lag_p99_us + ' \u00b5s')
  ]);
}
function render(d){
  REFRESH = d.refresh_ms || REFRESH;
  var h = document.getElementById('head'), m = document.getElementById('tables');
  h.replaceChildren(header(d));
  var kids = d.services.map(serviceTable);
  kids.push(backendTable(d));
  kids.push(eventsTable(d));
  (d.nic || []).forEach(function(n){ kids.push(nicTable(n)); });
  m.replaceChildren.apply(m, kids);
  document.getElementById('updated').textContent = new Date().toLocaleTimeString();
}
function msg(t){ document.getElementById('msg').textContent = t; }
function act(name, action){
  fetch('/api/server/' + encodeURIComponent(name) + '/' + action, {method: 'POST', credentials: 'same-origin'})
    .then(function(r){ return r.json().then(function(j){ msg((r.ok ? '' : 'error: ') + j.message); }); })
    .then(refresh, function(e){ msg('error: ' + e); });
}
function refresh(){
  return fetch('/stats.json', {cache: 'no-store', credentials: 'same-origin'})
    .then(function(r){ if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
    .then(function(d){ render(d); document.getElementById('stale').textContent = ''; },
          function(e){ document.getElementById('stale').textContent = ' (refresh failed: ' + e.message + ')'; });
}
function loop(){ refresh().then(function(){ setTimeout(loop, REFRESH); }); }
render(JSON.parse(document.getElementById('initial').textContent));
setTimeout(loop, REFRESH);
})();
"#;

/// The page, with `doc` embedded as its first data.
pub fn page(doc: &StatsDoc) -> String {
    // `<` never appears raw inside the script element, so nothing in a name can end it.
    let data = serde_json::to_string(doc)
        .unwrap_or_else(|_| "null".into())
        .replace('<', "\\u003c");
    let title = html_escape(&format!("lb {} statistics", doc.instance));
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head>\n<body>\
         <header id=\"head\"></header>\
         <main><div class=\"note\">updated <span id=\"updated\"></span><span id=\"stale\"></span>\
         <span id=\"msg\"></span> \u{b7} <a href=\"/stats.json\">json</a> \u{b7} \
         <a href=\"/;csv\">csv</a> \u{b7} <a href=\"/metrics\">metrics</a></div>\
         <div id=\"tables\"><noscript>This page draws its tables with JavaScript; \
         the same data is at /stats.json, /;csv and /metrics.</noscript></div></main>\
         <script id=\"initial\" type=\"application/json\">{data}</script>\
         <script>{SCRIPT}</script></body></html>\n"
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::model::tests::doc;

    #[test]
    fn the_page_is_self_contained_and_carries_the_document() {
        let mut d = doc();
        d.instance = "</script><b>x".into();
        let p = page(&d);
        assert!(
            !p.contains("http://") && !p.contains("https://"),
            "external reference"
        );
        assert!(!p.contains("src="), "no external script or image");
        // The only `</script` are the two closing tags.
        assert_eq!(p.matches("</script").count(), 2);
        assert!(p.contains("&lt;/script&gt;&lt;b&gt;x statistics</title>"));
        let start = p.find("type=\"application/json\">").unwrap() + 24;
        let end = start + p[start..].find("</script>").unwrap();
        let j: serde_json::Value = serde_json::from_str(&p[start..end]).unwrap();
        assert_eq!(j["instance"], "</script><b>x");
        assert_eq!(j["services"][0]["backends"][0]["backend"], "db01");
        assert_eq!(j["nic"][0]["counters"]["rx_xdp_packets"], 42);
        assert!(p.contains("NIC XDP counters") && p.contains("driver reports no XDP counters"));
    }
}
